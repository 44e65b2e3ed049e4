package imapwire

import (
	"bytes"
	"fmt"
	"strings"
)

// Head is what decides how a proxy forwards a command: its tag and name.
type Head struct {
	Tag  string
	Name string // upper case, without a UID prefix
	UID  bool
}

// ParseHead reads the tag and command name from a command's first line
// (up to its first literal header, or its line end). It reads the whole
// line, however long the tag, and it is stricter than Dovecot: one SP
// between words, and a tag without any character that RFC 9051 section 9
// (tag = 1*<any ASTRING-CHAR except "+">) or Dovecot forbids. A line it
// refuses may be one Dovecot would run; a proxy that refuses such lines
// itself can never forward a command it did not recognise.
func ParseHead(line []byte) (Head, error) {
	line = bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r"))
	var h Head
	sp := bytes.IndexByte(line, ' ')
	if sp < 0 {
		return h, fmt.Errorf("no command name after the tag")
	}
	tag := line[:sp]
	if !strictTag(tag) {
		return h, fmt.Errorf("invalid tag")
	}
	h.Tag = string(tag)
	name, rest := nextWord(line[sp+1:])
	if strings.EqualFold(name, "UID") {
		h.UID = true
		name, _ = nextWord(rest)
	}
	if name == "" {
		return h, fmt.Errorf("missing command name")
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c < 'A' || (c > 'Z' && c < 'a') || c > 'z' {
			if c != '-' && c != '.' && (c < '0' || c > '9') {
				return h, fmt.Errorf("invalid command name")
			}
		}
	}
	h.Name = strings.ToUpper(name)
	return h, nil
}

// nextWord returns the word up to the next SP and what follows that SP.
func nextWord(b []byte) (string, []byte) {
	if i := bytes.IndexByte(b, ' '); i >= 0 {
		return string(b[:i]), b[i+1:]
	}
	return string(b), nil
}

// strictTag checks a tag against RFC 9051's grammar (no atom-specials, no
// "+") and Dovecot's own check, which also refuses "/" and "]".
func strictTag(tag []byte) bool {
	if len(tag) == 0 {
		return false
	}
	for _, c := range tag {
		if c <= ' ' || c >= 0x7f {
			return false
		}
		switch c {
		case '+', '(', ')', '{', '%', '*', '"', '\\', ']', '/':
			return false
		}
	}
	return true
}
