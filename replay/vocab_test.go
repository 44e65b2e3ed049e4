package replay_test

import (
	"encoding/json"
	"testing"

	"github.com/undomail/undomail/replay"
	"github.com/undomail/undomail/undolog"
	"github.com/undomail/undomail/verb"
)

// TestReplayAgreesWithTheRegistry: a kind package verb says is replayed
// (Replay.How) is made again by the replay when it had an effect, and a
// kind it says is not (Replay.Why) never is. Each registered kind is
// given a user and every shape of "it had an effect" the log knows (an
// IMAP OK, a delivery accepted for a recipient, a FETCH that set \Seen);
// the replay's split of the verb must agree with the registry.
func TestReplayAgreesWithTheRegistry(t *testing.T) {
	js := func(v any) json.RawMessage {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	imapOK := js(verb.IMAPOutcome{Status: "OK", Text: "done"})
	delivered := js(verb.DeliveryOutcome{Reply: &verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "Ok"},
		Rcpts: []verb.RcptReply{{Rcpt: "alice@example.test", Reply: verb.Reply{Code: 250, Enhanced: "2.0.0", Text: "Saved"}}}})
	shapes := []struct {
		name    string
		args    json.RawMessage
		outcome json.RawMessage
	}{
		{"IMAP command told OK", js(verb.IMAPArgs{Command: "X", Mailbox: "INBOX", UIDValidity: 7, UIDs: "1",
			UndoIDs: map[string]string{"1": "01M8X"}, Metadata: map[string]*string{"/private/comment": new(string)}}), imapOK},
		{"delivery accepted", js(verb.DeliveryArgs{UndoID: "01M8X", MailFrom: "s@example.test", Rcpts: []string{"alice@example.test"}}), delivered},
		{"FETCH that set \\Seen", js(verb.IMAPFetchArgs{Mailbox: "INBOX", UIDValidity: 7, UIDs: "1", UndoIDs: map[string]string{"1": "01M8X"}, Seen: true}), nil},
	}
	for _, name := range verb.Kinds() {
		k, _ := verb.Lookup(name)
		var made []string
		for i, s := range shapes {
			v := undolog.Verb{Record: undolog.Record{Seq: int64(10 + i), User: "alice", Session: "s1", Kind: name, Args: s.args}}
			if s.outcome != nil {
				v.Outcome = &undolog.Record{Seq: int64(20 + i), Kind: undolog.KindOutcome, Ref: v.Seq, Outcome: s.outcome}
			}
			if replay.HadEffect(v) {
				made = append(made, s.name)
			}
		}
		switch {
		case k.Replayed() && len(made) == 0:
			t.Errorf("%s: package verb says it is replayed (%s), but the replay makes none of its shapes again", name, k.Replay.How)
		case !k.Replayed() && len(made) > 0:
			t.Errorf("%s: package verb says it is not replayed (%s), but the replay makes it again as %v", name, k.Replay.Why, made)
		}
		if replay.Replayable[name] && !k.Replayed() {
			t.Errorf("%s: the plan lists it as replayable, package verb says it is not (%s)", name, k.Replay.Why)
		}
	}
	for name := range replay.Replayable {
		if _, ok := verb.Lookup(name); !ok {
			t.Errorf("%s: the plan lists it as replayable, package verb does not define it", name)
		}
	}
}
