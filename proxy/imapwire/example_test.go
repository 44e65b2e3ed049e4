package imapwire_test

import (
	"bytes"
	"fmt"
	"io"
	"strings"

	"github.com/undomail/undomail/proxy/imapwire"
)

// A proxy relays each part as it arrives and records the parsed command.
func ExampleCommandReader() {
	client := strings.NewReader("A1 UID STORE 4:5 +FLAGS.SILENT (\\Seen)\r\nA2 APPEND INBOX {11+}\r\nHello world\r\n")
	var upstream bytes.Buffer
	relay := func(p imapwire.Part) error {
		if p.Literal != nil {
			_, err := io.Copy(&upstream, p.Literal.Body)
			return err
		}
		_, err := upstream.Write(p.Raw)
		return err
	}
	r := imapwire.NewCommandReader(client, imapwire.Options{})
	for {
		cmd, err := r.Next(relay)
		if err != nil {
			break
		}
		fmt.Println(cmd.Tag, cmd.Name, cmd.UID, len(cmd.Args), len(cmd.Literals))
	}
	fmt.Println(upstream.Len(), "bytes relayed")
	// Output:
	// A1 STORE true 3 0
	// A2 APPEND false 2 1
	// 76 bytes relayed
}

// The server side yields tagged completions with their response codes.
func ExampleResponseReader() {
	server := strings.NewReader("* 3 EXPUNGE\r\nA4 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n")
	r := imapwire.NewResponseReader(server, imapwire.Options{})
	for {
		resp, err := r.Next(nil)
		if err != nil {
			break
		}
		if resp.Kind == imapwire.Tagged && resp.Code != nil {
			src, _ := imapwire.ParseSeqSet(resp.Code.Args[1].Text)
			fmt.Println(resp.Tag, resp.Name, resp.Code.Name, src)
			continue
		}
		fmt.Println(resp.Kind, resp.Number, resp.Name)
	}
	// Output:
	// untagged 3 EXPUNGE
	// A4 OK COPYUID [304 319:320]
}
