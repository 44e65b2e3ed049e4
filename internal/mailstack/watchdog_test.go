package mailstack

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestOwnerKilledLeavesNothing starts a stack in a child process (this test
// binary, as TestHelperOwner), holds an IMAP session open on it, kills the
// child with SIGKILL as go test's -timeout would, and checks that the
// watchdog stops every process of the instance and that its address can
// be claimed again.
func TestOwnerKilledLeavesNothing(t *testing.T) {
	if os.Geteuid() != 0 || len(Missing()) > 0 {
		t.Fatal("needs root and the mail stack's packages (CI has both)")
	}
	dir := filepath.Join(t.TempDir(), "owner")
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperOwner$", "-test.v")
	cmd.Env = append(os.Environ(), "MAILSTACK_HELPER_DIR="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var id, conf, imapAddr string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 4 && f[0] == "READY" {
			id, conf, imapAddr = f[1], f[2], f[3]
			break
		}
	}
	if id == "" {
		t.Fatalf("helper owner exited without starting its stack (%v)", sc.Err())
	}
	go func() {
		for sc.Scan() { // drain, so the child never blocks on its output
		}
	}()
	// An IMAP session open on the stack: its process would linger.
	c, err := net.DialTimeout("tcp", imapAddr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial the helper's Dovecot at %s: %v", imapAddr, err)
	}
	defer c.Close()
	fmt.Fprintf(c, "a LOGIN alice secret-alice\r\n")
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("log in at %s: %v", imapAddr, err)
		}
		if strings.HasPrefix(line, "a ") {
			if !strings.HasPrefix(line, "a OK") {
				t.Fatalf("log in at %s: %q", imapAddr, line)
			}
			break
		}
	}
	probe := &Stack{id: id, dovecotConf: conf}
	if pids := probe.instancePIDs(); len(pids) < 3 {
		t.Fatalf("helper's stack has processes %v, want both masters and more", pids)
	}

	cmd.Process.Kill()
	cmd.Wait()

	deadline := time.Now().Add(30 * time.Second)
	for len(probe.instancePIDs()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("processes %v of the killed owner's stack still running 30 s later", probe.instancePIDs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	host, _, _ := net.SplitHostPort(imapAddr)
	l, err := net.Listen("tcp", net.JoinHostPort(host, fmt.Sprint(claimPort)))
	if err != nil {
		t.Fatalf("address %s still claimed after its owner died: %v", host, err)
	}
	l.Close()
}

// TestHelperOwner is the child of TestOwnerKilledLeavesNothing: it starts a
// stack, says where, and waits to be killed.
func TestHelperOwner(t *testing.T) {
	dir := os.Getenv("MAILSTACK_HELPER_DIR")
	if dir == "" {
		t.Skip("only runs as the child of TestOwnerKilledLeavesNothing")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Start(ctx, Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("READY %s %s %s\n", s.id, s.dovecotConf, s.IMAPAddr)
	time.Sleep(5 * time.Minute) // killed long before
	s.Stop()
}
