package outbound

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/undomail/undomail/verb"
)

// Postfix runs Postfix's own queue tools on the machine Postfix runs on:
// postqueue(1) to list the queue and release one message, postcat(1) to
// read a queued message's header, postsuper(1) to delete one. undomail
// never writes Postfix's queue files itself.
type Postfix struct {
	// Config is Postfix's configuration directory (-c); "" is Postfix's
	// default.
	Config string
	// Exec is a command prefix the tools run through ([sudo, -n]).
	Exec []string
	// Run runs one tool and returns its standard output and standard
	// error; nil runs it with os/exec. Tests substitute a fake queue.
	Run func(ctx context.Context, name string, args ...string) (stdout, stderr []byte, err error)
}

// toolTimeout bounds each call of a Postfix tool.
const toolTimeout = 30 * time.Second

func (p Postfix) run(ctx context.Context, name string, args ...string) (stdout, stderr []byte, err error) {
	if p.Config != "" {
		args = append([]string{"-c", p.Config}, args...)
	}
	ctx, cancel := context.WithTimeout(ctx, toolTimeout)
	defer cancel()
	if p.Run != nil {
		return p.Run(ctx, name, args...)
	}
	if len(p.Exec) > 0 {
		args = append(append(slices.Clone(p.Exec[1:]), name), args...)
		name = p.Exec[0]
	}
	cmd := exec.CommandContext(ctx, name, args...)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	out, err := cmd.Output()
	if err != nil {
		return out, errb.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out, errb.Bytes(), nil
}

// Entry is one message in Postfix's queue, as postqueue -j lists it.
type Entry struct {
	Queue       string      `json:"queue_name"`
	ID          string      `json:"queue_id"`
	ArrivalTime int64       `json:"arrival_time"`
	Sender      string      `json:"sender"`
	Recipients  []Recipient `json:"recipients"`
}

// Recipient is a recipient still to be delivered, with why it waits.
type Recipient struct {
	Address     string `json:"address"`
	DelayReason string `json:"delay_reason"`
}

// DeferredTransport is the delay reason Postfix gives a recipient whose
// transport is listed in defer_transports (postconf(5)): the window's
// mark. When qmgr meets such a recipient while the deferral of another
// has throttled the same destination, the reason reads "delivery
// temporarily suspended: deferred transport"; the cause is the same.
const DeferredTransport = "deferred transport"

// Held returns the recipients the window holds: deferred only because
// their transport is in defer_transports.
//
// Such a message waits in the deferred queue, or in the incoming queue:
// when qmgr, about to try a deferred message again, finds its queue file
// still locked by the delivery agent that deferred it last time (the
// agent reports before it closes the file, and on a busy machine it can
// wait to run in between), it logs "skipped, still being delivered" and
// puts the file in the incoming queue with its time stamp a minute
// ahead. Its recipients keep their delay reason, and defer_transports
// defers them again when qmgr takes it back. Not holding it there would
// leave it out of the window for that minute, where a cycle cannot
// cancel it. A message in the active queue is being tried: with a flush
// (postqueue -f or -i) it may be leaving, so it is not held there.
func (e Entry) Held() []string {
	if e.Queue != "deferred" && e.Queue != "incoming" {
		return nil
	}
	var out []string
	for _, r := range e.Recipients {
		if strings.HasSuffix(r.DelayReason, DeferredTransport) {
			out = append(out, r.Address)
		}
	}
	return out
}

// Queue lists Postfix's queue (postqueue -j: one JSON object per line,
// Postfix 3.1 and later).
func (p Postfix) Queue(ctx context.Context) ([]Entry, error) {
	out, _, err := p.run(ctx, "postqueue", "-j")
	if err != nil {
		return nil, fmt.Errorf("list Postfix's queue: %w", err)
	}
	var es []Entry
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 || line[0] != '{' {
			continue
		}
		var e Entry
		if err := json.Unmarshal(line, &e); err != nil {
			return nil, fmt.Errorf("list Postfix's queue: postqueue -j line %q: %w", line, err)
		}
		es = append(es, e)
	}
	return es, sc.Err()
}

// Header is what the window reads of a queued message's header.
type Header struct {
	UndoID    string // the topmost Undomail-Id: the front door's
	Subject   string
	MessageID string
}

var headerLine = regexp.MustCompile(`(?i)^(` + verb.TraceHeader + `|Subject|Message-Id):[ \t]*(.*)$`)

// Header reads a queued message's header (postcat -h -q).
func (p Postfix) Header(ctx context.Context, queueID string) (Header, error) {
	out, _, err := p.run(ctx, "postcat", "-h", "-q", queueID)
	if err != nil {
		return Header{}, fmt.Errorf("read the header of queued message %s: %w", queueID, err)
	}
	var h Header
	for _, line := range strings.Split(string(out), "\n") {
		m := headerLine.FindStringSubmatch(strings.TrimRight(line, "\r"))
		if m == nil {
			continue
		}
		v := strings.TrimSpace(m[2])
		switch strings.ToLower(m[1]) {
		case strings.ToLower(verb.TraceHeader):
			if h.UndoID == "" {
				h.UndoID = v
			}
		case "subject":
			if h.Subject == "" {
				h.Subject = v
			}
		case "message-id":
			if h.MessageID == "" {
				h.MessageID = v
			}
		}
	}
	return h, nil
}

// InQueue reports whether a message is still in Postfix's queue, in any
// of its queues (postcat -q, which looks through them all twice, so a
// message moving from one to another is found). false: it left.
func (p Postfix) InQueue(ctx context.Context, queueID string) (bool, error) {
	_, msg, err := p.run(ctx, "postcat", "-h", "-q", queueID)
	if err == nil {
		return true, nil
	}
	// postcat: fatal: open queue file ID: No such file or directory
	if strings.Contains(string(msg), "open queue file") && strings.Contains(string(msg), "No such file or directory") {
		return false, nil
	}
	return false, fmt.Errorf("look for queued message %s: %w", queueID, err)
}

// Release asks Postfix to deliver one deferred message now (postqueue
// -i, Postfix 3.5 and later), which overrides defer_transports for it.
func (p Postfix) Release(ctx context.Context, queueID string) error {
	if _, _, err := p.run(ctx, "postqueue", "-i", queueID); err != nil {
		return fmt.Errorf("release queued message %s: %w", queueID, err)
	}
	return nil
}

// Delete removes one message from Postfix's queue (postsuper -d); false
// if it was no longer there.
func (p Postfix) Delete(ctx context.Context, queueID string) (bool, error) {
	_, msg, err := p.run(ctx, "postsuper", "-d", queueID)
	if err != nil {
		return false, fmt.Errorf("delete queued message %s: %w", queueID, err)
	}
	// postsuper says what it did on standard error.
	return strings.Contains(string(msg), "Deleted: 1 message"), nil
}

// DeferTransports is Postfix's defer_transports setting (postconf -h).
func (p Postfix) DeferTransports(ctx context.Context) (string, error) {
	out, _, err := p.run(ctx, "postconf", "-h", "defer_transports")
	if err != nil {
		return "", fmt.Errorf("read Postfix's defer_transports: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}
