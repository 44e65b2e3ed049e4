package mailstack_test

import (
	"context"
	"log/slog"
	"os"
	"testing"

	"github.com/undomail/undomail/internal/mailstack"
)

func TestZZTiming(t *testing.T) {
	l := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	os.RemoveAll("/tmp/mstest1")
	s, err := mailstack.Start(context.Background(), mailstack.Options{Dir: "/tmp/mstest1", Logger: l})
	if err != nil {
		t.Fatal(err)
	}
	_ = s
}
