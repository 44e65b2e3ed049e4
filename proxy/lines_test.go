package proxy_test

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// lineReader reads raw SMTP replies in tests.
type lineReader struct {
	conn net.Conn
	br   *bufio.Reader
}

func newLineReader(c net.Conn) *lineReader { return &lineReader{conn: c, br: bufio.NewReader(c)} }

// expect reads one (possibly multi-line) reply and fails unless its code
// starts with prefix. It returns the reply's lines.
func (r *lineReader) expect(t *testing.T, prefix string) []string {
	t.Helper()
	r.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	var lines []string
	for {
		line, err := r.br.ReadString('\n')
		if err != nil && err != io.EOF {
			t.Fatalf("read reply (want %s): %v; got so far %q", prefix, err, lines)
		}
		line = strings.TrimRight(line, "\r\n")
		lines = append(lines, line)
		if len(line) < 4 || line[3] != '-' {
			break
		}
	}
	if !strings.HasPrefix(lines[0], prefix) {
		t.Fatalf("reply %q, want %s", lines, prefix)
	}
	return lines
}

// line reads one line (IMAP responses are read line by line).
func (r *lineReader) line(t *testing.T) string {
	t.Helper()
	r.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	l, err := r.br.ReadString('\n')
	if err != nil {
		t.Fatalf("read line: %v", err)
	}
	return strings.TrimRight(l, "\r\n")
}

// until reads lines until one starts with prefix and returns them all.
func (r *lineReader) until(t *testing.T, prefix string) []string {
	t.Helper()
	var lines []string
	for {
		l := r.line(t)
		lines = append(lines, l)
		if strings.HasPrefix(l, prefix) {
			return lines
		}
	}
}
