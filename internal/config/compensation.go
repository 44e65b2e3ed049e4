package config

import (
	"errors"
	"fmt"
	"net/mail"
)

// Compensation says what a cycle does about the paradoxes it creates
// (docs/architecture.md, "Compensation"): who explanations come from, whom users are
// told to ask, whether the operator gets a notice, and a policy per kind
// of paradox.
type Compensation struct {
	// Postmaster is the From of the explanations users get, an RFC 5322
	// address. Empty: "Mail administrator <postmaster@HOSTNAME>".
	Postmaster string `yaml:"postmaster"`
	// Contact tells users whom to ask, in words ("the help desk,
	// help@example.org, extension 4711"). Empty: "your mail administrator".
	Contact string `yaml:"contact"`
	// Operator, if set, receives a notice after each cycle listing every
	// paradox explained to users or left to the operator. It is delivered
	// through Dovecot's LMTP, so it must be a local mailbox.
	Operator string `yaml:"operator"`
	// Subject of the explanation users get. Empty: "Your mailbox was
	// repaired: what changed".
	Subject string `yaml:"subject"`
	// Domain completes a user's address when the log holds no mail
	// delivered to them. Empty: the bare user name.
	Domain string `yaml:"domain"`
	// Policies say, per kind of paradox, whether it is explained to the
	// user (explain), only reported to the operator (notify), or left
	// alone (ignore). Empty values keep the defaults.
	Policies CompensationPolicies `yaml:"policies"`
}

// CompensationPolicies holds a policy per paradox kind: "ignore",
// "explain" or "notify"; "" is the kind's default.
type CompensationPolicies struct {
	// ReadRemoved: a message the user read is gone (default explain).
	ReadRemoved string `yaml:"read_removed"`
	// ReadMoved: a message the user read was filed into another folder
	// by a filter (default ignore).
	ReadMoved string `yaml:"read_moved"`
	// ReadChanged: a message the user read has different content now
	// (default explain).
	ReadChanged string `yaml:"read_changed"`
	// DeliveryLost: a sender was told a message was delivered and now it
	// is not (default explain; senders outside are notified).
	DeliveryLost string `yaml:"delivery_lost"`
	// ActionFailed: a command the user was told succeeded could not be
	// redone (default explain).
	ActionFailed string `yaml:"action_failed"`
	// SentOnwards: the user copied, moved, replied to or forwarded a
	// message the repair removed (default explain).
	SentOnwards string `yaml:"sent_onwards"`
	// ActionCancelled: the operator cancelled a command the user was
	// told succeeded (default ignore).
	ActionCancelled string `yaml:"action_cancelled"`
	// Misdelivered: a message the user read was delivered to them by
	// mistake and the repaired mail system delivers it to someone else
	// (default explain; the operator notice lists it as exposure).
	Misdelivered string `yaml:"misdelivered"`
	// RefusedByMistake: mail to the user was refused (5xx) during the bad
	// period and the repaired mail system delivered it (default explain;
	// the operator notice lists the senders who were told 5xx).
	RefusedByMistake string `yaml:"refused_by_mistake"`
	// HeldOutside: the repaired mail system delivers a message to a
	// destination outside the machine; the replay held it, unsent
	// (default notify: the operator decides whether it goes).
	HeldOutside string `yaml:"held_outside"`
}

// ByKind returns the configured policies by paradox kind name, leaving
// out the defaults.
func (p CompensationPolicies) ByKind() map[string]string {
	out := map[string]string{}
	for k, v := range map[string]string{
		"read_removed": p.ReadRemoved, "read_moved": p.ReadMoved, "read_changed": p.ReadChanged,
		"delivery_lost": p.DeliveryLost, "action_failed": p.ActionFailed, "sent_onwards": p.SentOnwards,
		"action_cancelled": p.ActionCancelled, "misdelivered": p.Misdelivered,
		"refused_by_mistake": p.RefusedByMistake, "held_outside": p.HeldOutside,
	} {
		if v != "" {
			out[k] = v
		}
	}
	return out
}

// Check refuses values that cannot work, naming the key.
func (c Compensation) Check() error {
	var errs []error
	if c.Postmaster != "" {
		if _, err := mail.ParseAddress(c.Postmaster); err != nil {
			errs = append(errs, fmt.Errorf("compensation.postmaster: %q is not an address: %v", c.Postmaster, err))
		}
	}
	if c.Operator != "" {
		if _, err := mail.ParseAddress(c.Operator); err != nil {
			errs = append(errs, fmt.Errorf("compensation.operator: %q is not an address: %v", c.Operator, err))
		}
	}
	for k, v := range c.Policies.ByKind() {
		switch v {
		case "ignore", "explain", "notify":
		default:
			errs = append(errs, fmt.Errorf("compensation.policies.%s: %q is not one of ignore, explain, notify", k, v))
		}
	}
	return errors.Join(errs...)
}
