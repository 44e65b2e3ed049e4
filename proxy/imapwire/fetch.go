package imapwire

import "strings"

// FetchData is what the proxy needs from a FETCH response (RFC 9051
// section 7.5.2): the message's UID, flags and mod-sequence, and which body
// sections it carried. Everything else stays in Response.Args.
type FetchData struct {
	// UID is the message's UID, 0 if the response did not include it.
	UID uint32
	// Flags are the message's flags as written, when HasFlags is set.
	Flags []string
	// HasFlags is set when the response included FLAGS (possibly empty).
	HasFlags bool
	// ModSeq is the MODSEQ (RFC 7162 section 3.1.4.1), 0 if not included.
	ModSeq uint64
	// Sections are the body contents returned: BODY[...], BINARY[...],
	// RFC822, RFC822.HEADER and RFC822.TEXT.
	Sections []FetchSection
}

// FetchSection is one body content item of a FETCH response.
type FetchSection struct {
	// Name is the item name as written, such as "BODY[HEADER]" or
	// "BODY[]<0>" or "RFC822.HEADER".
	Name string
	// Section is the parsed bracket of BODY[...] and BINARY[...] items.
	Section *Section
	// Size is the content size in bytes; 0 for NIL.
	Size int64
	// Nil is set when the server returned NIL for the content.
	Nil bool
	// Literal is set when the content came as a literal; its Data holds
	// the content if it was small enough to capture.
	Literal *Literal
}

// bodyItems are the msg-att-static items that carry message content
// (RFC 9051 section 7.5.2; RFC822* from RFC 3501 section 7.4.2).
var bodyItems = map[string]bool{"RFC822": true, "RFC822.HEADER": true, "RFC822.TEXT": true}

// parseFetch extracts FetchData from the "(" msg-att ")" of a FETCH
// response, a list of item names each followed by its value.
func parseFetch(p *parser, r *Response) (*FetchData, error) {
	if !r.HasNumber {
		return nil, p.errorf("FETCH response without a message number")
	}
	if len(r.Args) != 1 || r.Args[0].Kind != List {
		return nil, p.errorf("FETCH response data is not one parenthesized list")
	}
	items := r.Args[0].List
	if len(items)%2 != 0 {
		return nil, p.errorf("FETCH item %q has no value", items[len(items)-1].Text)
	}
	fd := &FetchData{}
	for i := 0; i < len(items); i += 2 {
		name, val := items[i], items[i+1]
		if name.Kind != Atom {
			return fd, p.errorf("FETCH item name is a %s", name.Kind)
		}
		if sec := name.Section; sec != nil {
			if sec.Name == "BODY" || sec.Name == "BINARY" {
				if err := fd.addSection(p, name, val); err != nil {
					return fd, err
				}
			}
			continue
		}
		switch upper := strings.ToUpper(name.Text); {
		case upper == "UID":
			if val.Kind != Number || val.Num == 0 || val.Num > 1<<32-1 {
				return fd, p.errorf("FETCH UID is not a 32-bit nz-number")
			}
			fd.UID = uint32(val.Num)
		case upper == "FLAGS":
			if val.Kind != List {
				return fd, p.errorf("FETCH FLAGS is not a list")
			}
			fd.HasFlags = true
			fd.Flags = make([]string, 0, len(val.List))
			for _, f := range val.List {
				if f.Kind != Atom {
					return fd, p.errorf("FETCH flag is a %s", f.Kind)
				}
				fd.Flags = append(fd.Flags, f.Text)
			}
		case upper == "MODSEQ":
			// RFC 7162 section 7: "MODSEQ" SP "(" permsg-modsequence ")".
			if val.Kind != List || len(val.List) != 1 || val.List[0].Kind != Number {
				return fd, p.errorf("FETCH MODSEQ is not a parenthesized number")
			}
			fd.ModSeq = val.List[0].Num
		case bodyItems[upper]:
			if err := fd.addSection(p, name, val); err != nil {
				return fd, err
			}
		}
	}
	return fd, nil
}

func (fd *FetchData) addSection(p *parser, name, val Value) error {
	s := FetchSection{Name: name.Text, Section: name.Section}
	switch val.Kind {
	case Nil:
		s.Nil = true
	case Quoted:
		s.Size = int64(len(val.Text))
	case LiteralString:
		s.Size = val.Literal.Size
		s.Literal = val.Literal
	default:
		return p.errorf("FETCH %s value is a %s", name.Text, val.Kind)
	}
	fd.Sections = append(fd.Sections, s)
	return nil
}
