package imapwire

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// refuseAtHeader is a forwarder like the proxy's: it forwards each line
// and, at a line ending in a synchronizing literal's header, waits for the
// server, which here refuses.
func refuseAtHeader(out *bytes.Buffer) Forward {
	return func(p Part) error {
		if p.Literal != nil {
			return errors.New("literal content reached the forwarder after a refusal")
		}
		out.Write(p.Raw)
		if bytes.HasSuffix(p.Raw, []byte("}\r\n")) && !bytes.HasSuffix(p.Raw, []byte("+}\r\n")) {
			return ErrLiteralRefused
		}
		return nil
	}
}

// TestCommandRefusedAtHeader: a server may answer a synchronizing literal
// with a tagged response before the forwarder sees the literal part
// (Dovecot answers "NOOP {104857600}" with OK, RFC 9051 section 7.5); the
// command ends at the header and the next one is read.
func TestCommandRefusedAtHeader(t *testing.T) {
	input := "n NOOP {104857600}\r\na1 APPEND INBOX {99999}\r\na2 NOOP\r\n"
	var out bytes.Buffer
	r := NewCommandReader(strings.NewReader(input), Options{})
	cmd, err := r.Next(refuseAtHeader(&out))
	var se *SyntaxError
	if !errors.As(err, &se) || cmd == nil || !cmd.Refused || cmd.Tag != "n" || cmd.Name != "NOOP" {
		t.Fatalf("NOOP with a refused literal: %+v, %v; want it refused, with NOOP's syntax error", cmd, err)
	}
	cmd, err = r.Next(refuseAtHeader(&out))
	if err != nil || !cmd.Refused || cmd.Tag != "a1" || cmd.Name != "APPEND" || len(cmd.Args) != 2 || cmd.Args[1].Kind != LiteralString {
		t.Fatalf("refused APPEND = %+v, %v", cmd, err)
	}
	cmd, err = r.Next(refuseAtHeader(&out))
	if err != nil || cmd.Tag != "a2" || cmd.Name != "NOOP" || cmd.Refused {
		t.Fatalf("next command = %+v, %v; want a2 NOOP", cmd, err)
	}
	if out.String() != input {
		t.Fatalf("forwarded %q, want %q", out.String(), input)
	}
	// A non-synchronizing literal's content follows at once: refusing it
	// at its header would lose the stream.
	r = NewCommandReader(strings.NewReader("a1 APPEND INBOX {3+}\r\nabc\r\n"), Options{})
	_, err = r.Next(func(p Part) error {
		if p.Raw != nil && bytes.HasSuffix(p.Raw, []byte("}\r\n")) {
			return ErrLiteralRefused
		}
		return nil
	})
	if !errors.Is(err, ErrLiteralRefused) {
		t.Fatalf("non-synchronizing literal refused at its header: %v, want a final error", err)
	}
}

// TestMaxCommand: with MaxCommand a literal is measured with everything
// before it, as Dovecot's login process does with its 8192-byte limit
// (measured against Dovecot 2.3.19: "a LOGIN {8178}" is invited, "{8179}"
// refused; after "a LOGIN {4}", 4 bytes and " {8168}" is the largest).
func TestMaxCommand(t *testing.T) {
	opts := Options{MaxLine: 8192, MaxCommand: 8192}
	for _, tc := range []struct {
		input string
		ok    bool
	}{
		{"a LOGIN {8178}\r\n" + strings.Repeat("x", 8178) + " y\r\n", true},
		{"a LOGIN {8179}\r\n", false},
		{"a LOGIN {104857600}\r\n", false},
		{"a LOGIN {4}\r\nabcd {8168}\r\n" + strings.Repeat("x", 8168) + "\r\n", true},
		{"a LOGIN {4}\r\nabcd {8169}\r\n", false},
		{"a LOGIN {4+}\r\nabcd {8169+}\r\n", false},
		{"tag LOGIN {8176}\r\n" + strings.Repeat("x", 8176) + " y\r\n", true},
		{"tag LOGIN {8177}\r\n", false},
	} {
		r := NewCommandReader(strings.NewReader(tc.input), opts)
		invited := 0
		cmd, err := r.Next(func(p Part) error {
			if p.Literal != nil {
				invited++
			}
			return nil
		})
		var te *LiteralTooLargeError
		switch {
		case tc.ok && (err != nil || cmd.Name != "LOGIN"):
			t.Errorf("%.40q: %v, want LOGIN read whole", tc.input, err)
		case !tc.ok && !errors.As(err, &te):
			t.Errorf("%.40q: %v, want *LiteralTooLargeError", tc.input, err)
		case !tc.ok && invited == strings.Count(tc.input, "}\r\n"):
			t.Errorf("%.40q: the refused literal reached the forwarder", tc.input)
		}
	}
}

// TestSetOptions: limits change between commands without losing what the
// client pipelined.
func TestSetOptions(t *testing.T) {
	big := strings.Repeat("x", 10000)
	input := "a LOGIN u p\r\nb APPEND INBOX {10000}\r\n" + big + "\r\n"
	r := NewCommandReader(strings.NewReader(input), Options{MaxLine: 8192, MaxCommand: 8192})
	if cmd, err := r.Next(nil); err != nil || cmd.Name != "LOGIN" {
		t.Fatalf("LOGIN: %v, %v", cmd, err)
	}
	r.SetOptions(Options{})
	cmd, err := r.Next(nil)
	if err != nil || cmd.Name != "APPEND" || len(cmd.Literals) != 1 || string(cmd.Literals[0].Data) != big {
		t.Fatalf("APPEND after raising the limits: %v, %v", cmd, err)
	}
}

// TestSyncLiteralTooLargeInStep: a synchronizing literal over the limit
// leaves the reader in step, since the client sends nothing more until it
// is answered; the command's head is returned for the answer. A
// non-synchronizing one, whose content is on its way, is final.
func TestSyncLiteralTooLargeInStep(t *testing.T) {
	input := "a1 UID APPEND INBOX {2147483648}\r\na2 NOOP\r\na3 LOGIN {1}\r\nx {2147483648}\r\na4 NOOP\r\n"
	var out bytes.Buffer
	r := NewCommandReader(strings.NewReader(input), Options{})
	cmd, err := r.Next(copier(&out))
	var tl *LiteralTooLargeError
	if !errors.As(err, &tl) || !tl.InStep || tl.Size != 2147483648 || cmd == nil || cmd.Tag != "a1" || cmd.Name != "APPEND" || !cmd.UID {
		t.Fatalf("APPEND {2147483648}: %+v, %v; want an in-step *LiteralTooLargeError with the head a1 UID APPEND", cmd, err)
	}
	if out.Len() != 0 {
		t.Fatalf("forwarded %q of the refused command", out.String())
	}
	if cmd, err := r.Next(copier(&out)); err != nil || cmd.Tag != "a2" || cmd.Name != "NOOP" {
		t.Fatalf("after the refusal: %+v, %v; want a2 NOOP", cmd, err)
	}
	cmd, err = r.Next(copier(&out))
	if !errors.As(err, &tl) || !tl.InStep || cmd.Tag != "a3" || cmd.Name != "LOGIN" {
		t.Fatalf("second-line literal: %+v, %v", cmd, err)
	}
	if want := "a2 NOOP\r\na3 LOGIN {1}\r\nx"; out.String() != want {
		t.Fatalf("forwarded %q, want %q: what came before the refused line", out.String(), want)
	}
	if cmd, err := r.Next(nil); err != nil || cmd.Tag != "a4" {
		t.Fatalf("after the second refusal: %+v, %v; want a4", cmd, err)
	}

	r = NewCommandReader(strings.NewReader("a1 APPEND INBOX {2147483648+}\r\nabc"), Options{})
	if _, err = r.Next(nil); !errors.As(err, &tl) || tl.InStep {
		t.Fatalf("non-synchronizing: %v, want a final *LiteralTooLargeError", err)
	}
	if _, err2 := r.Next(nil); err2 != err {
		t.Fatalf("after a final error Next returned %v", err2)
	}
	// A server's literal is sent at once: never in step.
	rr := NewResponseReader(strings.NewReader("* 1 FETCH (BODY[] {2147483648}\r\n"), Options{})
	if _, err := rr.Next(nil); !errors.As(err, &tl) || tl.InStep {
		t.Fatalf("response literal: %v, want a final *LiteralTooLargeError", err)
	}
}
