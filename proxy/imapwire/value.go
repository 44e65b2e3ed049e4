package imapwire

import (
	"strconv"
	"strings"
)

// Kind says what a [Value] is.
type Kind uint8

// The kinds of argument values (RFC 9051 section 4).
const (
	// Atom is a bare word: a command keyword, a flag, a sequence set, a
	// FETCH attribute such as BODY.PEEK[HEADER]<0.1024>.
	Atom Kind = iota
	// Number is an atom made only of digits that fits in 64 bits.
	Number
	// Nil is the atom NIL.
	Nil
	// Quoted is a quoted string; Text holds it unescaped.
	Quoted
	// LiteralString is a literal; Text holds its content if it was captured.
	LiteralString
	// List is a parenthesized list.
	List
)

var kindNames = [...]string{"atom", "number", "NIL", "quoted string", "literal", "list"}

// String names the kind for messages.
func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Value is one parsed argument.
type Value struct {
	// Kind says which of the other fields are meaningful.
	Kind Kind
	// Text is the atom as written (for Atom, Number and Nil), the unescaped
	// content of a Quoted string, or the captured content of a
	// LiteralString (empty when the content was only streamed).
	Text string
	// Num is the value of a Number.
	Num uint64
	// List holds the elements of a List.
	List []Value
	// Section is set for an Atom with a bracketed FETCH section, such as
	// BODY.PEEK[HEADER.FIELDS (FROM)]<0.1024>.
	Section *Section
	// Literal is set for a LiteralString.
	Literal *Literal
}

// Section is the bracketed part of a FETCH attribute (RFC 9051 section 6.4.5
// and 7.5.2, RFC 3516 section 4.1).
type Section struct {
	// Name is the attribute before the bracket, upper-cased: BODY,
	// BODY.PEEK, BINARY, BINARY.PEEK or BINARY.SIZE.
	Name string
	// Spec is the upper-cased text inside the brackets before any field
	// list: "", "HEADER", "HEADER.FIELDS", "1.2.TEXT", ...
	Spec string
	// Fields lists the header field names of HEADER.FIELDS and
	// HEADER.FIELDS.NOT.
	Fields []string
	// Partial is set when a <offset.length> or <offset> suffix was given.
	Partial bool
	// Offset is the first octet of a partial fetch.
	Offset uint64
	// Length is the octet count of a partial fetch; 0 when only the offset
	// was given, as in FETCH responses.
	Length uint64
}

// String returns what [Value.AString] returns, "" for lists and literals
// that were not captured. Note that fmt prints a Value with it, so a List
// prints as "".
func (v Value) String() string {
	s, _ := v.AString()
	return s
}

// AString returns the string an astring or nstring argument denotes
// (RFC 9051 section 9): the text of an atom, number, quoted string or
// captured literal, and "" for NIL. ok is false for lists and for literals
// whose content was not captured.
func (v Value) AString() (s string, ok bool) {
	switch v.Kind {
	case Atom, Number, Quoted:
		return v.Text, true
	case Nil:
		return "", true
	case LiteralString:
		return v.Text, v.Literal != nil && v.Literal.Data != nil
	}
	return "", false
}

// Is reports whether v is an atom equal to word, ignoring case, as IMAP
// keywords are (RFC 9051 section 9, note 1).
func (v Value) Is(word string) bool {
	return (v.Kind == Atom || v.Kind == Nil) && strings.EqualFold(v.Text, word)
}
