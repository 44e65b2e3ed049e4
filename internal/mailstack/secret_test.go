package mailstack

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestPasswdFilesPrivate: the passwd-files holding the users' and the
// master user's passwords are 0600, owned by the user Dovecot's auth
// process runs as, and that process can read them: both kinds of login
// work. (The demo's stack is started by this same code.)
func TestPasswdFilesPrivate(t *testing.T) {
	if os.Geteuid() != 0 || len(Missing()) > 0 {
		t.Fatal("needs root and the mail stack's packages (CI has both)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Start(ctx, Options{Dir: filepath.Join(t.TempDir(), "stack")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
	})
	uid, _, err := authUser()
	if err != nil {
		t.Fatal(err)
	}
	confDir := filepath.Dir(s.dovecotConf)
	for _, name := range []string{"users", "master-users"} {
		st, err := os.Stat(filepath.Join(confDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 || int(st.Sys().(*syscall.Stat_t).Uid) != uid {
			t.Errorf("%s: mode %v owner %d, want 0600 owned by %s (%d)", name, st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Uid, AuthUser, uid)
		}
	}
	// Logins make the auth process read both files.
	for _, login := range []struct{ user, pass string }{
		{"alice", s.Password("alice")},
		{"alice*" + s.MasterUser, s.MasterPassword},
	} {
		if line := imapLogin(t, s.IMAPAddr, login.user, login.pass); !strings.HasPrefix(line, "a OK") {
			t.Errorf("login as %s: %q", login.user, line)
		}
	}
	// The process that read them runs as the files' owner.
	authTitle := "dovecot-umdc-" + s.id + "/auth"
	found := false
	for _, pid := range s.instancePIDs() {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if !strings.HasPrefix(string(cmdline), authTitle) || strings.HasPrefix(string(cmdline), authTitle+"-") {
			continue
		}
		found = true
		if got := procUID(t, pid); got != uid {
			t.Errorf("dovecot's auth process %d runs as uid %d, the passwd-files belong to %d", pid, got, uid)
		}
	}
	if !found {
		t.Errorf("no auth process (%s) among the instance's processes", authTitle)
	}
}

// imapLogin logs in at addr with a raw IMAP LOGIN and returns the tagged
// reply line.
func imapLogin(t *testing.T, addr, user, pass string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(c, "a LOGIN %q %q\r\n", user, pass)
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("login as %s at %s: %v", user, addr, err)
		}
		if strings.HasPrefix(line, "a ") {
			return strings.TrimSpace(line)
		}
	}
}

// procUID returns the real uid of a process, from /proc/PID/status.
func procUID(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[0] == "Uid:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("no Uid in /proc/%d/status", pid)
	return -1
}
