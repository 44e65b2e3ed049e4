// Command undomail is the undo system for e-mail: a transparent proxy in
// front of Dovecot and Postfix that records every user action in an undo
// log, plus the operator's tools to inspect and verify that log.
//
// One file per subcommand. cobra is used for the command tree because
// undomail has many operator subcommands with shared flags, and cobra gives
// consistent help, flag parsing and shell completion for all of them.
package main

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"
	"github.com/undomail/undomail/internal/loadtest"
)

func main() {
	loadtest.RunSourceIfAsked() // undomail load's load source, a process of its own
	root := &cobra.Command{
		Use:           "undomail",
		Short:         "Undo for e-mail: record every action in front of Dovecot and Postfix, rewind, repair, replay",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(serveCmd(), logCmd(), fsckCmd(), snapshotCmd(), snapshotsCmd(), rewindCmd(), replayCmd(), cycleCmd(), demoCmd(), loadCmd())
	root.AddCommand(compensationsCmd())
	root.AddCommand(drillCmd(), filtersCmd(), pruneCmd())
	root.AddCommand(statusCmd()) // status.go: through the admin API
	root.AddCommand(outboundCmd())
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "undomail:", err)
		os.Exit(exitCode(err))
	}
}

// exitError carries a specific exit status (fsck: 1 = problems found).
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func exitCode(err error) int {
	if e, ok := err.(*exitError); ok {
		return e.code
	}
	return 2
}

func newLogger(level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}
