package mailstack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Program paths. They are absolute so the stack works whatever PATH is
// (/usr/sbin is often missing from a non-login PATH).
const (
	dovecotBin   = "/usr/sbin/dovecot"
	doveadmBin   = "/usr/bin/doveadm"
	postfixBin   = "/usr/sbin/postfix"
	postconfBin  = "/usr/sbin/postconf"
	postqueueBin = "/usr/sbin/postqueue"
)

// binaries maps each program the stack needs to the Debian package that
// ships it. Dovecot starts imap and lmtp from its libexec directory.
var binaries = []struct{ path, pkg string }{
	{dovecotBin, "dovecot-core"},
	{doveadmBin, "dovecot-core"},
	{"/usr/lib/dovecot/imap", "dovecot-imapd"},
	{"/usr/lib/dovecot/lmtp", "dovecot-lmtpd"},
	{postfixBin, "postfix"},
	{postconfBin, "postfix"},
	{postqueueBin, "postfix"},
	// Sieve: the operator-error scenario misconfigures a global script.
	{"/usr/bin/sievec", "dovecot-sieve"},
}

// Missing returns the Debian packages the stack needs that are not
// installed, each once; it is empty when everything is present.
func Missing() []string {
	var missing []string
	seen := map[string]bool{}
	for _, b := range binaries {
		if seen[b.pkg] {
			continue
		}
		if st, err := os.Stat(b.path); err != nil || st.Mode()&0o111 == 0 {
			seen[b.pkg] = true
			missing = append(missing, b.pkg)
		}
	}
	return missing
}

// makeTraversable creates dir and adds r-x for group and others to it and to
// every parent that lacks them. It only adds bits, so /tmp keeps its sticky
// world-writable mode.
func makeTraversable(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create instance dir: %w", err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("stat %s: %w", d, err)
		}
		if mode := st.Mode().Perm(); mode&0o055 != 0o055 {
			if err := os.Chmod(d, mode|0o755); err != nil {
				return fmt.Errorf("make %s traversable: %w", d, err)
			}
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

// shortBaseDir returns Dovecot's base_dir for instance id. It holds unix
// sockets, whose paths are limited to 108 bytes, so it cannot live in a test's
// deep temporary directory.
func shortBaseDir(id string) string { return shortDir("umdc-", id) }

// shortDir is a directory with a short path for instance id: under /run,
// or the temporary directory where there is no /run.
func shortDir(prefix, id string) string {
	if st, err := os.Stat("/run"); err == nil && st.IsDir() {
		return "/run/" + prefix + id
	}
	return filepath.Join(os.TempDir(), prefix+id)
}

// errPortInUse marks a start failure caused by a port taken between checking
// it and the daemon binding it; Start retries those on another address.
var errPortInUse = errors.New("port already in use")

// claimHost claims the stack's loopback address and sets its listener
// addresses, trying the next port set if a wildcard listener holds one of
// the first set's ports on every candidate address.
func (s *Stack) claimHost() error {
	var errs []error
	for _, ports := range stackPortSets {
		h, err := ClaimHost(ports[:]...)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		s.host, s.Host = h, h.IP
		s.IMAPAddr, s.LMTPAddr, s.AuthAddr, s.SMTPAddr = h.Addr(ports[0]), h.Addr(ports[1]), h.Addr(ports[2]), h.Addr(ports[3])
		return nil
	}
	return errors.Join(errs...)
}

// port returns the port part of a host:port address.
func port(addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return p
}

// run runs a short-lived command and returns its stdout; a failure includes
// its stderr. Stdout and stderr are separate buffers, never pipes held by a
// daemon: commands that daemonise get openDaemonOutput instead.
func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "),
			err, strings.TrimSpace(stderr.String()+"\n"+stdout.String()))
	}
	return stdout.Bytes(), nil
}

// runDaemonCommand runs a command that daemonises (dovecot, postfix start)
// with stdin from /dev/null and stdout/stderr appended to outPath: a daemon
// that inherits a pipe keeps it open and the caller would hang reading it.
func (s *Stack) runDaemonCommand(ctx context.Context, outPath string, name string, args ...string) error {
	out, err := os.OpenFile(outPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open %s: %w", outPath, err)
	}
	defer out.Close()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = out, out
	s.logger.Debug("mail stack command", "cmd", name, "args", args)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w", filepath.Base(name), strings.Join(args, " "), err)
	}
	return nil
}

// logTail returns the last lines of the given files, labelled, for error
// messages; unreadable files are skipped.
func logTail(lines int, paths ...string) string {
	var b strings.Builder
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil || len(bytes.TrimSpace(data)) == 0 {
			continue
		}
		ls := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(ls) > lines {
			ls = ls[len(ls)-lines:]
		}
		fmt.Fprintf(&b, "\n--- tail of %s ---\n%s", p, strings.Join(ls, "\n"))
	}
	return b.String()
}

// instancePIDs returns every running Dovecot and Postfix process of this
// instance. Postfix processes carry envMarker in their environment. Dovecot
// overwrites its environment with process titles, so its processes are known
// by name instead: children are titled "dovecot-umdc-<id>/<service>" (from
// instance_name), and the master still has its "dovecot -c <config>" command
// line.
func (s *Stack) instancePIDs() []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	marker := []byte(envMarker + "=" + s.id)
	childTitle := []byte("dovecot-umdc-" + s.id + "/")
	masterArgs := []byte("\x00-c\x00" + s.dovecotConf + "\x00")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		// Unreadable means gone or a zombie: nothing left to stop.
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if bytes.HasPrefix(cmdline, childTitle) ||
			(bytes.HasPrefix(cmdline, []byte(dovecotBin+"\x00")) && bytes.HasSuffix(cmdline, masterArgs)) {
			pids = append(pids, pid)
			continue
		}
		env, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if slices.ContainsFunc(bytes.Split(env, []byte{0}), func(kv []byte) bool { return bytes.Equal(kv, marker) }) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Bounds for reapInstance. Dovecot's imap processes can outlive the master by
// about 9 s; a stopped stack should not make every test wait that long, and
// they hold nothing worth keeping once the master is gone.
const (
	gracefulExitWait = 3 * time.Second
	termExitWait     = 3 * time.Second
	killExitWait     = 2 * time.Second
)

// reapInstance waits for the instance's processes to exit after the daemons
// were told to stop, then sends SIGTERM and finally SIGKILL to stragglers.
func (s *Stack) reapInstance() error {
	if s.waitNoProcesses(gracefulExitWait) {
		return nil
	}
	for _, sig := range []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGTERM, termExitWait}, {syscall.SIGKILL, killExitWait}} {
		pids := s.instancePIDs()
		s.logger.Warn("mail stack processes left after stop, signalling", "dir", s.Dir, "pids", pids, "signal", sig.sig)
		for _, pid := range pids {
			_ = syscall.Kill(pid, sig.sig) // it may have exited meanwhile
		}
		if s.waitNoProcesses(sig.wait) {
			return nil
		}
	}
	return fmt.Errorf("processes %v still running after SIGKILL", s.instancePIDs())
}

// waitNoProcesses polls until no instance process is left or d has passed.
func (s *Stack) waitNoProcesses(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if len(s.instancePIDs()) == 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFor polls check every interval until it returns nil or ctx ends, and
// then returns check's last error.
func waitFor(ctx context.Context, interval time.Duration, check func() error) error {
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-time.After(interval):
		}
	}
}

// KillDovecot kills every Dovecot process of the instance with SIGKILL,
// as a crash would; StartDovecot starts it again. Fault-injection tests.
func (s *Stack) KillDovecot() {
	s.killInstance(true)
	// A killed master's pid may linger as a zombie of ours; Dovecot would
	// take it for a running instance.
	os.Remove(filepath.Join(s.dovecotBaseDir, "master.pid"))
}

// KillPostfix kills every Postfix process of the instance with SIGKILL;
// StartPostfix starts it again.
func (s *Stack) KillPostfix() { s.killInstance(false) }

// StartDovecot starts Dovecot after KillDovecot and waits until it serves.
func (s *Stack) StartDovecot(ctx context.Context) error { return s.startDovecot(ctx) }

// StartPostfix starts Postfix after KillPostfix and waits until it serves.
func (s *Stack) StartPostfix(ctx context.Context) error { return s.startPostfix(ctx) }

func (s *Stack) killInstance(dovecot bool) {
	childTitle := []byte("dovecot-umdc-" + s.id + "/")
	for _, pid := range s.instancePIDs() {
		cmdline, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		isDovecot := bytes.HasPrefix(cmdline, childTitle) || bytes.HasPrefix(cmdline, []byte(dovecotBin+"\x00"))
		if isDovecot == dovecot {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	// Wait until they are gone, so a restart does not race them.
	for range 100 {
		left := false
		for _, pid := range s.instancePIDs() {
			cmdline, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
			isDovecot := bytes.HasPrefix(cmdline, childTitle) || bytes.HasPrefix(cmdline, []byte(dovecotBin+"\x00"))
			if isDovecot == dovecot {
				left = true
			}
		}
		if !left {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}
