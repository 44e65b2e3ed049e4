package loadtest

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
)

// SourceOptions describe one run of the typical-mail load source.
type SourceOptions struct {
	Addr     string
	Sessions int
	Messages int
	Size     int
	From, To string
	Reuse    bool // all of a session's messages over one connection
	LMTP     bool
}

// Source sends o.Messages distinct typical messages (TypicalMessage)
// over o.Sessions concurrent sessions, like Postfix's smtp-source but
// with content that compresses like mail and is never the same twice
// (smtp-source sends the same lines of X every time, which a log that
// compresses and deduplicates stores for nothing). Any refused message
// fails the run. undomail load runs it in a process of its own, so
// undomail's CPU time is its own.
func Source(ctx context.Context, o SourceOptions) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, o.Sessions)
	for s := range o.Sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(s)))
			var c *smtp.Client
			defer func() {
				if c != nil {
					c.Quit()
					c.Close()
				}
			}()
			for ctx.Err() == nil {
				i := next.Add(1)
				if i > int64(o.Messages) {
					return
				}
				if c == nil {
					var err error
					if c, err = dialSource(o); err != nil {
						errs <- err
						return
					}
				}
				msg := TypicalMessage(rng, o.From, o.To, fmt.Sprintf("load %d", i), o.Size)
				if err := c.SendMail(o.From, []string{o.To}, strings.NewReader(msg)); err != nil {
					errs <- fmt.Errorf("message %d to %s: %w", i, o.Addr, err)
					return
				}
				if !o.Reuse {
					c.Quit()
					c.Close()
					c = nil
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	return ctx.Err()
}

func dialSource(o SourceOptions) (*smtp.Client, error) {
	conn, err := net.DialTimeout("tcp", o.Addr, 30*time.Second)
	if err != nil {
		return nil, err
	}
	c := smtp.NewClient(conn)
	if o.LMTP {
		c = smtp.NewClientLMTP(conn)
	}
	if err := c.Hello("load.test"); err != nil {
		c.Close()
		return nil, fmt.Errorf("greet %s: %w", o.Addr, err)
	}
	return c, nil
}

// sourceEnv carries SourceOptions (JSON) to the process that runs the
// load source: undomail load re-executes its own binary with it.
const sourceEnv = "UNDOMAIL_LOAD_SOURCE"

// RunSourceIfAsked runs the load source and exits if this process was
// started as one (by runSource): call it first in main, and in TestMain
// of tests that measure.
func RunSourceIfAsked() {
	spec := os.Getenv(sourceEnv)
	if spec == "" {
		return
	}
	var o SourceOptions
	if err := json.Unmarshal([]byte(spec), &o); err != nil {
		fmt.Fprintf(os.Stderr, "load source: bad %s: %v\n", sourceEnv, err)
		os.Exit(2)
	}
	if err := Source(context.Background(), o); err != nil {
		fmt.Fprintf(os.Stderr, "load source: %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// runSource runs Source in a child process of this binary and waits.
func runSource(ctx context.Context, o SourceOptions) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("load source: %w", err)
	}
	spec, _ := json.Marshal(o)
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(), sourceEnv+"="+string(spec))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("load source against %s: %v: %s", o.Addr, err, out)
	}
	return nil
}
