package replay

import (
	"context"
	"strings"
	"testing"

	"github.com/undomail/undomail/verb"
)

const plainMsg = "From: a@example.test\r\nSubject: =?utf-8?q?Gro=C3=9Fer_Gewinn?=\r\n\r\nClick here to claim.\r\n"

const mimeMsg = "Subject: invoice\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" +
	"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n" +
	"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"invoice.exe\"\r\n\r\nMZ\r\n--b--\r\n"

func TestFilterRules(t *testing.T) {
	env := verb.DeliveryArgs{MailFrom: "promo@spam.example", Rcpts: []string{"bob@example.test"}}
	for _, tc := range []struct {
		rule string
		msg  string
		want bool
	}{
		{`header:Subject=~(?i)gewinn`, plainMsg, true}, // decoded RFC 2047
		{`header:Subject=~lottery`, plainMsg, false},
		{`header:X-Spam-Flag=~YES`, plainMsg, false}, // absent field
		{`from=~@spam\.example$`, plainMsg, true},
		{`rcpt=~^alice@`, plainMsg, false},
		{`rcpt=~^bob@`, plainMsg, true},
		{`body=~(?i)click here`, plainMsg, true},
		{`attachment=~\.exe$`, mimeMsg, true},
		{`attachment=~\.exe$`, plainMsg, false},
		{`cmd:grep -q Click`, plainMsg, false},         // exit 0: clean
		{`cmd:grep -q lottery`, plainMsg, true},        // exit 1: matches (spamc -c style)
		{`cmd:grep --no-such-flag x`, plainMsg, false}, // exit 2: broken classifier
	} {
		f, err := ParseFilter(tc.rule, "drop")
		if err != nil {
			t.Fatalf("%s: %v", tc.rule, err)
		}
		got, err := f.Match(context.Background(), env, []byte(tc.msg))
		if strings.Contains(tc.rule, "no-such-flag") {
			// A classifier that fails (exit status other than 0 or 1) is
			// an error, never a silent match or miss.
			if err == nil {
				t.Fatalf("%s: want an error for exit status 2", tc.rule)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Fatalf("%s on %q: %v, %v; want %v", tc.rule, tc.msg[:20], got, err, tc.want)
		}
	}
}

func TestFilterRefusesBadSpecs(t *testing.T) {
	for _, tc := range []struct{ rule, action, want string }{
		{`Subject=~x`, "drop", "unknown field"},
		{`header:Subject~x`, "drop", "want FIELD=~REGEXP"},
		{`body=~(`, "drop", "missing closing"},
		{`cmd:`, "drop", "empty command"},
		{`from=~x`, "delete", "want drop or move:FOLDER"},
		{`from=~x`, "move:", "want drop or move:FOLDER"},
	} {
		_, err := ParseFilter(tc.rule, tc.action)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseFilter(%q, %q) = %v, want an error with %q", tc.rule, tc.action, err, tc.want)
		}
	}
}
