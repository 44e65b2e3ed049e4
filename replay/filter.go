package replay

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"mime"
	"net/mail"
	"net/textproto"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-message"
	"github.com/undomail/undomail/verb"
)

// Filter is a retroactive filter on deliveries, a repair: during replay a
// delivery it matches is dropped or filed into a folder instead of the
// INBOX. The same filter can stay active for live mail afterwards.
//
// Rules are written as FIELD=~REGEXP:
//
//	header:Subject=~(?i)lottery   a header field (decoded)
//	from=~@spam\.example$         the envelope sender
//	rcpt=~^bob@                   any envelope recipient
//	body=~(?i)click here          the message text (first 1 MiB)
//	attachment=~\.(exe|scr)$      an attachment's file name or content type
//
// or as a classifier command fed the message on stdin, which matches when
// it exits with status 1 (spamc -c, clamdscan -):
//
//	cmd:spamc -c
type Filter struct {
	Spec   string
	Action string // "drop" or "move:FOLDER"

	// after and before, when set, limit the filter to deliveries logged
	// after < seq < before: the ones the cycle that applied it judged.
	after, before int64

	field   string // header:X, from, rcpt, body, attachment, cmd
	re      *regexp.Regexp
	command []string
}

// ParseFilter parses a rule and its action ("drop" or "move:FOLDER").
func ParseFilter(spec, action string) (*Filter, error) {
	f := &Filter{Spec: spec, Action: action}
	if action != "drop" && !(strings.HasPrefix(action, "move:") && len(action) > len("move:")) {
		return nil, fmt.Errorf("filter action %q: want drop or move:FOLDER", action)
	}
	if cmd, ok := strings.CutPrefix(spec, "cmd:"); ok {
		f.field, f.command = "cmd", strings.Fields(cmd)
		if len(f.command) == 0 {
			return nil, fmt.Errorf("filter %q: empty command", spec)
		}
		return f, nil
	}
	field, expr, ok := strings.Cut(spec, "=~")
	if !ok {
		return nil, fmt.Errorf("filter %q: want FIELD=~REGEXP or cmd:COMMAND", spec)
	}
	switch {
	case strings.HasPrefix(field, "header:") && len(field) > len("header:"),
		field == "from", field == "rcpt", field == "body", field == "attachment":
	default:
		return nil, fmt.Errorf("filter %q: unknown field %q (header:NAME, from, rcpt, body, attachment)", spec, field)
	}
	re, err := regexp.Compile(expr)
	if err != nil {
		return nil, fmt.Errorf("filter %q: %w", spec, err)
	}
	f.field, f.re = field, re
	return f, nil
}

// maxBodyScan bounds how much of a message body rules read.
const maxBodyScan = 1 << 20

// Match reports whether the filter matches a delivery.
func (f *Filter) Match(ctx context.Context, a verb.DeliveryArgs, msg []byte) (bool, error) {
	switch {
	case f.field == "cmd":
		ctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		c := exec.CommandContext(ctx, f.command[0], f.command[1:]...)
		c.Stdin = bytes.NewReader(msg)
		err := c.Run()
		var ee *exec.ExitError
		switch {
		case err == nil:
			return false, nil
		case errors.As(err, &ee) && ee.ExitCode() == 1:
			return true, nil
		}
		return false, fmt.Errorf("classifier %q: %w", strings.Join(f.command, " "), err)
	case f.field == "from":
		return f.re.MatchString(a.MailFrom), nil
	case f.field == "rcpt":
		for _, r := range a.Rcpts {
			if f.re.MatchString(r) {
				return true, nil
			}
		}
		return false, nil
	}
	m, err := mail.ReadMessage(bufio.NewReader(bytes.NewReader(msg)))
	if err != nil {
		return false, nil // not a parsable message: no header or body rule can match
	}
	switch {
	case strings.HasPrefix(f.field, "header:"):
		dec := mime.WordDecoder{}
		for _, v := range m.Header[textproto.CanonicalMIMEHeaderKey(strings.TrimPrefix(f.field, "header:"))] {
			if d, err := dec.DecodeHeader(v); err == nil {
				v = d
			}
			if f.re.MatchString(v) {
				return true, nil
			}
		}
		return false, nil
	case f.field == "body":
		b := make([]byte, maxBodyScan)
		n, _ := m.Body.Read(b)
		return f.re.Match(b[:n]), nil
	case f.field == "attachment":
		return f.matchAttachment(msg), nil
	}
	return false, nil
}

// matchAttachment looks at every MIME part's file name and content type.
func (f *Filter) matchAttachment(msg []byte) bool {
	e, err := message.Read(bytes.NewReader(msg))
	if e == nil {
		return false
	}
	_ = err // unknown charsets still give the structure
	found := false
	e.Walk(func(_ []int, part *message.Entity, _ error) error {
		ct, params, _ := part.Header.ContentType()
		_, dparams, _ := part.Header.ContentDisposition()
		for _, s := range []string{ct, params["name"], dparams["filename"]} {
			if s != "" && f.re.MatchString(s) {
				found = true
			}
		}
		return nil
	})
	return found
}

// filterSet applies a replay's filters; workers replaying different
// recipients of one delivery share its verdict, so a classifier command
// runs once per delivery.
type filterSet struct {
	filters  []*Filter
	mu       sync.Mutex
	verdicts map[int64]filterVerdict
}

type filterVerdict struct {
	f   *Filter // nil: no filter matched
	err error
}

// judge returns the filter that matches delivery seq, if any.
func (s *filterSet) judge(ctx context.Context, seq int64, a verb.DeliveryArgs, msg func() ([]byte, error)) (*Filter, error) {
	if len(s.filters) == 0 {
		return nil, nil
	}
	s.mu.Lock()
	v, ok := s.verdicts[seq]
	s.mu.Unlock()
	if ok {
		return v.f, v.err
	}
	v = s.match(ctx, seq, a, msg)
	s.mu.Lock()
	s.verdicts[seq] = v
	s.mu.Unlock()
	return v.f, v.err
}

func (s *filterSet) match(ctx context.Context, seq int64, a verb.DeliveryArgs, msg func() ([]byte, error)) filterVerdict {
	var body []byte
	for _, f := range s.filters {
		if (f.before > 0 && seq >= f.before) || seq <= f.after {
			continue
		}
		if body == nil {
			b, err := msg()
			if err != nil {
				return filterVerdict{err: fmt.Errorf("read message blob: %w", err)}
			}
			body = b
		}
		hit, err := f.Match(ctx, a, body)
		if err != nil {
			return filterVerdict{err: err}
		}
		if hit {
			return filterVerdict{f: f}
		}
	}
	return filterVerdict{}
}
