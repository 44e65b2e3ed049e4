package config

import (
	"net/mail"
	"net/url"
	"time"
)

// Drills schedule recovery drills and say where their verdicts go
// (docs/architecture.md, "Recovery drills"). A drill reports every time, pass or fail:
// a missing report is how an operator notices a drill that did not run.
type Drills struct {
	// Every runs a drill this often, over the newest two snapshots with no
	// rewind between them (0: only when asked, undomail drill). At least
	// a minute.
	Every Duration `yaml:"every"`
	// Notify, if set, is mailed each drill's verdict, through Postfix
	// (smtp.upstream), or Dovecot's LMTP when there is no front door.
	Notify string `yaml:"notify"`
	// Webhook, if set, is POSTed each drill's verdict as JSON
	// ({"ok":..., "from":..., "to":..., "differences":[...]}); http or
	// https.
	Webhook string `yaml:"webhook"`
}

func (d Drills) validate(bad func(key, format string, args ...any)) {
	if d.Every != 0 && time.Duration(d.Every) < time.Minute {
		bad("drills.every", "%v is too often: at least 1m, or 0 to run drills only when asked", time.Duration(d.Every))
	}
	if d.Notify != "" {
		if _, err := mail.ParseAddress(d.Notify); err != nil {
			bad("drills.notify", "%q is not a mail address: %v", d.Notify, err)
		}
	}
	if d.Webhook != "" {
		u, err := url.Parse(d.Webhook)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("drills.webhook", "%q is not an http or https URL", d.Webhook)
		}
	}
}
