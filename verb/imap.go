package verb

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// This file holds what the IMAP kind families share: decoding a
// command's arguments and telling its tagged response (RFC 9051 section
// 7.1) in words.

// imapArgs decodes an IMAP command's arguments; ok is false if they are
// not an IMAP command's.
func imapArgs(r Record) (IMAPArgs, bool) {
	var a IMAPArgs
	return a, json.Unmarshal(r.Args, &a) == nil && a.Command != ""
}

// imapOutcome tells the tagged response a client was given.
func imapOutcome(raw json.RawMessage) string {
	var o IMAPOutcome
	if len(raw) == 0 || json.Unmarshal(raw, &o) != nil || o.Status == "" {
		return flatten(raw)
	}
	switch strings.ToUpper(o.Status) {
	case "OK":
		s := strings.TrimSuffix(o.Summary(), ".") // "OK [CODE] text": what the client saw
		if o.Modified != "" {
			s += "; left alone, changed since (RFC 7162): uid " + o.Modified
		}
		if o.Expunged != nil {
			s += "; the server expunged " + plural(*o.Expunged, "message")
		}
		return s
	case "NO":
		return "refused by the server: " + codeText(o)
	case "BAD":
		return "rejected by the server as invalid: " + codeText(o)
	}
	return o.Summary()
}

func codeText(o IMAPOutcome) string {
	s := o.Text
	if o.Code != "" {
		s = "[" + o.Code + "] " + s
	}
	if s == "" {
		return "no reason given"
	}
	return strings.TrimSpace(s)
}

// imapCommand describes a user's IMAP command: the operator's line is the
// command as the client sent it, with its messages resolved to UIDs;
// user(a) is the same for the user.
func imapCommand(user func(IMAPArgs) string) func(Record) Description {
	return func(r Record) Description {
		a, ok := imapArgs(r)
		if !ok {
			return Description{What: strings.TrimPrefix(r.Kind, "imap.") + ": " + flatten(r.Args), Outcome: imapOutcome(r.Outcome)}
		}
		d := Description{What: a.Summary(), ForUser: user(a)}
		if r.Answered {
			d.Outcome = imapOutcome(r.Outcome)
		}
		return d
	}
}

// messages says how many messages a UID or sequence set names, in words.
func messages(a IMAPArgs) string {
	set := a.UIDs
	if set == "" {
		set = a.Seqs
	}
	if n, ok := setSize(set); ok {
		return plural(n, "message")
	}
	if set == "" {
		return "the messages"
	}
	return "messages " + set
}

// setSize counts the numbers of a sequence set (RFC 9051 section 9,
// sequence-set); false if it has "*" or is not one.
func setSize(set string) (int, bool) {
	if set == "" {
		return 0, false
	}
	n := 0
	for _, part := range strings.Split(set, ",") {
		lo, hi, isRange := strings.Cut(part, ":")
		a, err1 := strconv.ParseUint(lo, 10, 32)
		b := a
		var err2 error
		if isRange {
			b, err2 = strconv.ParseUint(hi, 10, 32)
		}
		if err1 != nil || err2 != nil {
			return 0, false
		}
		if b < a {
			a, b = b, a
		}
		n += int(b-a) + 1
	}
	return n, true
}

// folder names a mailbox for a user.
func folder(name string) string {
	if name == "" {
		return "the mailbox"
	}
	return fmt.Sprintf("%q", name)
}
