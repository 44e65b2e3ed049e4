package compensate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/mail"
	"time"

	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// Options configure Run.
type Options struct {
	// Policies say what is done about each kind; kinds not in it get
	// DefaultPolicies.
	Policies map[Kind]Policy
	// Postmaster is the From of digests and notices, an RFC 5322
	// address ("Mail administrator <postmaster@example.org>").
	Postmaster string
	// Contact says whom users ask, in words ("the help desk,
	// help@example.org, extension 4711").
	Contact string
	// Operator, if set, receives the operator notice listing every
	// paradox explained or notified; a mailbox Dovecot delivers to.
	Operator string
	// Subject of digests; "" is DefaultSubject.
	Subject string
	// Domain completes a user's address when the log holds no delivery
	// to them; "" delivers to the bare user name.
	Domain string
	// Hostname names undomail in LHLO and Message-IDs.
	Hostname string
	// LMTPAddr is Dovecot's LMTP, where digests are delivered.
	LMTPAddr string
	// Checker reads messages as they are now, for read_changed; nil
	// skips that check.
	Checker ContentChecker
	Logger  *slog.Logger
}

func (o Options) policy(k Kind) Policy {
	if p, ok := o.Policies[k]; ok {
		return p
	}
	if p, ok := o.Policies[ReadRemoved]; ok && k == Restored {
		return p
	}
	return DefaultPolicies()[k]
}

// Run finds the paradoxes of cycle c (Detect, and the read_changed check
// through o.Checker), decides per kind's policy what to do, delivers one
// digest to each user with something to explain and the operator notice,
// and logs each as a compensation verb. Paradoxes an earlier compensation
// already took care of are left alone. The report is filled in even when
// an error (a digest that could not be delivered) is returned.
func Run(ctx context.Context, l *undolog.Log, c Cycle, o Options) (Report, error) {
	var rep Report
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Subject == "" {
		o.Subject = DefaultSubject
	}
	if o.Postmaster == "" {
		o.Postmaster = "Mail administrator <postmaster@" + o.Hostname + ">"
	}
	if _, err := mail.ParseAddress(o.Postmaster); err != nil {
		return rep, fmt.Errorf("compensate: postmaster address %q: %w", o.Postmaster, err)
	}
	f, err := Detect(ctx, l, c)
	if err != nil {
		return rep, err
	}
	if o.Checker != nil && o.policy(ReadChanged) != Ignore && len(f.Reads) > 0 {
		changed, err := checkContent(ctx, l, o.Checker, f.Reads)
		if err != nil {
			return rep, err
		}
		f.Paradoxes = append(f.Paradoxes, changed...)
	}
	earlier, err := List(ctx, l, undolog.Filter{})
	if err != nil {
		return rep, fmt.Errorf("compensate: %w", err)
	}
	prior := compensated(earlier)
	if o.Checker != nil && o.policy(Restored) != Ignore {
		back, err := checkRestored(ctx, o.Checker, earlier)
		if err != nil {
			return rep, err
		}
		f.Paradoxes = append(f.Paradoxes, back...)
	}
	digests := map[string][]Paradox{} // by userKey
	names := map[string]string{}
	var notice []Paradox
	for _, p := range f.Paradoxes {
		pol := o.policy(p.Kind)
		key := p.Key()
		switch {
		case !p.Observed:
			rep.count(p.Kind, Counts{Silent: 1})
		case pol == Ignore:
			rep.count(p.Kind, Counts{Ignored: 1})
		case pol == Explain && p.User != "":
			if prior[AudienceUser][key] {
				rep.count(p.Kind, Counts{Already: 1})
				continue
			}
			u := userKey(p.User)
			digests[u] = append(digests[u], p)
			if names[u] == "" {
				names[u] = p.User
			}
			rep.count(p.Kind, Counts{Explained: 1})
			rep.Paradoxes = append(rep.Paradoxes, p)
			o.Logger.Info("paradox to explain", "cycle", c.Seq, "kind", p.Kind, "user", p.User, "verb", p.Verb, "verb_kind", p.VerbKind, "now", p.Now)
			if o.Operator != "" && !prior[AudienceOperator][key] {
				notice = append(notice, p)
			}
		default: // notify, or nobody here to explain it to
			if prior[AudienceOperator][key] {
				rep.count(p.Kind, Counts{Already: 1})
				continue
			}
			rep.count(p.Kind, Counts{Notified: 1})
			rep.Paradoxes = append(rep.Paradoxes, p)
			notice = append(notice, p)
			o.Logger.Warn("paradox for the operator", "cycle", c.Seq, "kind", p.Kind, "user", p.User, "verb", p.Verb, "now", p.Now)
		}
	}
	sortParadoxes(rep.Paradoxes)
	var errs []error
	for _, u := range sortedKeys(digests) {
		ps := digests[u]
		sortParadoxes(ps)
		to := f.Addresses[u]
		if to == "" {
			to = u
			if o.Domain != "" {
				to = u + "@" + o.Domain
			}
		}
		letter := Letter{From: o.Postmaster, To: to, Name: names[u], Subject: o.Subject, Cycle: c, Contact: o.Contact, Paradoxes: ps}
		seq, err := o.send(ctx, l, letter, AudienceUser, names[u], BuildDigest)
		if seq != 0 {
			rep.Records = append(rep.Records, seq)
		}
		if err != nil {
			rep.Failed = append(rep.Failed, "digest for "+names[u])
			errs = append(errs, fmt.Errorf("compensate: digest for %s (cycle %d): %w", names[u], c.Seq, err))
			continue
		}
		rep.Digests = append(rep.Digests, names[u])
		o.Logger.Info("digest delivered", "cycle", c.Seq, "user", names[u], "seq", seq, "paradoxes", len(ps))
	}
	if o.Operator != "" && len(notice) > 0 {
		sortParadoxes(notice)
		letter := Letter{From: o.Postmaster, To: o.Operator, Name: "operator", Cycle: c, Contact: o.Contact, Paradoxes: notice,
			Subject: fmt.Sprintf("undomail: cycle %d changed %d things people had seen", c.Seq, len(notice))}
		seq, err := o.send(ctx, l, letter, AudienceOperator, userKey(o.Operator), BuildNotice)
		if seq != 0 {
			rep.Records = append(rep.Records, seq)
		}
		if err != nil {
			rep.Failed = append(rep.Failed, "operator notice to "+o.Operator)
			errs = append(errs, fmt.Errorf("compensate: operator notice to %s (cycle %d): %w", o.Operator, c.Seq, err))
		} else {
			rep.Notice = true
			o.Logger.Info("operator notice delivered", "cycle", c.Seq, "to", o.Operator, "seq", seq, "paradoxes", len(notice))
		}
	}
	return rep, errors.Join(errs...)
}

// send builds one letter, logs it as a compensation verb and delivers
// it. It returns the verb's seq once it is logged.
func (o Options) send(ctx context.Context, l *undolog.Log, letter Letter, audience, user string, build func(Letter) ([]byte, error)) (int64, error) {
	id := undolog.NewID()
	letter.MessageID = id + "@" + o.Hostname
	letter.Date = time.Now()
	msg, err := build(letter)
	if err != nil {
		return 0, err
	}
	a := Args{
		// The null reverse-path: an automatic message must never cause
		// a bounce or an auto-reply (RFC 3834 section 3.3).
		DeliveryArgs: verb.DeliveryArgs{UndoID: id, Rcpts: []string{letter.To}, Header: verb.HeaderInfo{
			MessageID: "<" + letter.MessageID + ">", From: letter.From, Subject: letter.Subject,
			Date: letter.Date.Format(time.RFC1123Z)}},
		Cycle: letter.Cycle.Seq, Audience: audience, User: user, Paradoxes: letter.Paradoxes,
	}
	seq, _, err := send(ctx, l, o.LMTPAddr, o.Hostname, a, msg)
	return seq, err
}
