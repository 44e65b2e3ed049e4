// Package privdovecot runs a private Dovecot for undomail's own use, on
// a loopback address of its own: IMAP and LMTP over a given mail root,
// with a master user (RFC 9051 LOGIN as "<user>*<master>"), nothing read
// from /etc/dovecot. A recovery drill replays the log against a clone of
// the mail store with one (docs/architecture.md, "Recovery drills");
// production is never touched.
//
// The Dovecot master runs in the foreground as a child of the process
// that started it and is sent SIGTERM if that process dies
// (PR_SET_PDEATHSIG), so none outlives it. Starting one requires root,
// as Dovecot switches to the mail user for the store.
package privdovecot

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/template"
	"time"
)

// Bin is the Dovecot master binary (Debian's dovecot-core).
const Bin = "/usr/sbin/dovecot"

// Ports on the server's own loopback address: the standard IMAP and LMTP
// ports, free there because the address is its own.
const (
	imapPort = 143
	lmtpPort = 24
)

// readyTimeout bounds the wait for Dovecot to serve once started.
const readyTimeout = 30 * time.Second

// Options configure Start.
type Options struct {
	// Dir holds the configuration, Dovecot's state and its log; it is
	// created.
	Dir string
	// MailRoot holds the users' maildirs, at MailRoot/<user>/Maildir.
	MailRoot string
	// Users are the users Dovecot knows; they log in only through the
	// master user.
	Users  []string
	Logger *slog.Logger
}

// Server is a running private Dovecot.
type Server struct {
	// IMAPAddr and LMTPAddr are its listeners.
	IMAPAddr, LMTPAddr string
	// MasterUser and MasterPassword log in as any user: login name
	// "<user>*<MasterUser>".
	MasterUser, MasterPassword string

	dir, baseDir, instance string
	logger                 *slog.Logger
	cmd                    *exec.Cmd
	exited                 chan struct{} // closed when the master has exited
	stopOnce               sync.Once
	stopErr                error
}

var config = template.Must(template.New("dovecot.conf").Parse(`# Written by undomail (internal/privdovecot): a private Dovecot.
instance_name = {{.Instance}}
base_dir = {{.BaseDir}}
state_dir = {{.StateDir}}
log_path = {{.LogPath}}
listen = {{.Host}}
protocols = imap lmtp
ssl = no
# Only the master user logs in, over this loopback address.
disable_plaintext_auth = no
auth_mechanisms = plain
auth_username_format = %Ln
auth_master_user_separator = *
mail_location = maildir:{{.MailRoot}}/%n/Maildir
# METADATA (RFC 5464), kept beside the user's mail as undomail's own
# Dovecot keeps it, so SETMETADATA replays.
imap_metadata = yes
mail_attribute_dict = file:{{.MailRoot}}/%n/Maildir/dovecot-attributes
mail_uid = {{.MailUID}}
mail_gid = {{.MailGID}}
first_valid_uid = {{.MailUID}}
first_valid_gid = {{.MailGID}}
namespace inbox {
  inbox = yes
}
passdb {
  driver = passwd-file
  master = yes
  args = scheme=PLAIN {{.MasterFile}}
  pass = yes
}
passdb {
  driver = passwd-file
  args = scheme=PLAIN {{.UsersFile}}
}
userdb {
  driver = passwd-file
  args = {{.UsersFile}}
}
service imap-login {
  inet_listener imap {
    port = {{.IMAPPort}}
  }
  inet_listener imaps {
    port = 0
  }
}
service lmtp {
  inet_listener lmtp {
    address = {{.Host}}
    port = {{.LMTPPort}}
  }
}
protocol lmtp {
  lmtp_save_to_detail_mailbox = no
}
`))

// Start writes the configuration into o.Dir, starts Dovecot on a
// loopback address of its own and returns once its IMAP and LMTP
// listeners greet. On failure nothing is left running.
func Start(ctx context.Context, o Options) (*Server, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("private dovecot: must run as root (Dovecot switches to the mail user)")
	}
	if _, err := os.Stat(Bin); err != nil {
		return nil, fmt.Errorf("private dovecot: %w (Debian package dovecot-core, with dovecot-imapd and dovecot-lmtpd)", err)
	}
	var err error
	for attempt := 1; ; attempt++ {
		var s *Server
		s, err = start(ctx, o)
		if err == nil {
			return s, nil
		}
		if attempt == 3 || !errors.Is(err, errAddrInUse) || ctx.Err() != nil {
			return nil, err
		}
		o.Logger.Warn("private dovecot: its address was taken, trying another", "err", err)
	}
}

var errAddrInUse = errors.New("address in use")

func start(ctx context.Context, o Options) (*Server, error) {
	id, err := randomHex(6)
	if err != nil {
		return nil, err
	}
	host, err := ownLoopback()
	if err != nil {
		return nil, err
	}
	master, err := randomHex(16)
	if err != nil {
		return nil, err
	}
	s := &Server{
		IMAPAddr: net.JoinHostPort(host, strconv.Itoa(imapPort)), LMTPAddr: net.JoinHostPort(host, strconv.Itoa(lmtpPort)),
		MasterUser: "undomail", MasterPassword: master,
		dir: o.Dir, instance: "undomail-pd-" + id, logger: o.Logger, exited: make(chan struct{}),
	}
	// base_dir holds unix sockets (108-byte paths): it must be short.
	s.baseDir = filepath.Join("/run", s.instance)
	if st, err := os.Stat("/run"); err != nil || !st.IsDir() {
		s.baseDir = filepath.Join(os.TempDir(), s.instance)
	}
	conf, err := s.writeConfig(o, host)
	if err != nil {
		return nil, err
	}
	out, err := os.OpenFile(filepath.Join(o.Dir, "dovecot.out"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("private dovecot: %w", err)
	}
	defer out.Close()
	s.cmd = exec.Command(Bin, "-F", "-c", conf)
	s.cmd.Stdout, s.cmd.Stderr = out, out
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM, Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("private dovecot: start %s: %w", Bin, err)
	}
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
	if err := s.waitReady(ctx); err != nil {
		s.Stop()
		tail := s.logTail()
		if strings.Contains(tail, "Address already in use") {
			return nil, fmt.Errorf("private dovecot on %s: %w: %w%s", host, errAddrInUse, err, tail)
		}
		return nil, fmt.Errorf("private dovecot on %s: %w%s", host, err, tail)
	}
	o.Logger.Info("private dovecot started", "imap", s.IMAPAddr, "lmtp", s.LMTPAddr, "dir", o.Dir, "mail_root", o.MailRoot)
	return s, nil
}

// writeConfig writes dovecot.conf and the passwd-files, returning the
// configuration's path.
func (s *Server) writeConfig(o Options, host string) (string, error) {
	mailUID, mailGID, err := lookupUser("mail")
	if err != nil {
		return "", err
	}
	// Dovecot's auth process reads the passwd-files as its internal user.
	authUID, authGID, err := lookupUser("dovecot")
	if err != nil {
		return "", err
	}
	state := filepath.Join(o.Dir, "state")
	for _, d := range []string{o.Dir, state} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", fmt.Errorf("private dovecot: %w", err)
		}
	}
	// Dovecot's processes run as the mail and dovecot users: every
	// directory above the configuration and the mail must let them
	// through.
	for _, d := range []string{o.Dir, o.MailRoot} {
		if err := traversable(d); err != nil {
			return "", err
		}
	}
	// Dovecot creates a user's Maildir that is not there yet as the mail
	// user.
	if err := os.Chown(o.MailRoot, mailUID, mailGID); err != nil {
		return "", fmt.Errorf("private dovecot: mail root: %w", err)
	}
	var users strings.Builder
	for _, u := range o.Users {
		if u == "" || strings.ContainsAny(u, ":@*/\n") {
			return "", fmt.Errorf("private dovecot: user %q cannot be a passwd-file user", u)
		}
		pw, err := randomHex(16) // never used: users log in through the master user
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&users, "%s:{PLAIN}%s::::::\n", u, pw)
	}
	usersFile, masterFile := filepath.Join(o.Dir, "users"), filepath.Join(o.Dir, "master-users")
	if err := writeSecret(usersFile, users.String(), authUID, authGID); err != nil {
		return "", err
	}
	if err := writeSecret(masterFile, fmt.Sprintf("%s:{PLAIN}%s::::::\n", s.MasterUser, s.MasterPassword), authUID, authGID); err != nil {
		return "", err
	}
	var b bytes.Buffer
	err = config.Execute(&b, map[string]any{
		"Instance": s.instance, "BaseDir": s.baseDir, "StateDir": state, "LogPath": filepath.Join(o.Dir, "dovecot.log"),
		"Host": host, "MailRoot": o.MailRoot, "MailUID": mailUID, "MailGID": mailGID,
		"MasterFile": masterFile, "UsersFile": usersFile, "IMAPPort": imapPort, "LMTPPort": lmtpPort,
	})
	if err != nil {
		return "", fmt.Errorf("private dovecot: configuration: %w", err)
	}
	conf := filepath.Join(o.Dir, "dovecot.conf")
	if err := os.WriteFile(conf, b.Bytes(), 0o644); err != nil {
		return "", fmt.Errorf("private dovecot: %w", err)
	}
	return conf, nil
}

// waitReady waits until IMAP greets with OK (RFC 9051 section 7.1.1) and
// LMTP with 220 (RFC 2033), or Dovecot exits.
func (s *Server) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	var last error
	for {
		last = nil
		for _, l := range []struct{ addr, greeting string }{{s.IMAPAddr, "* OK"}, {s.LMTPAddr, "220"}} {
			if err := greets(l.addr, l.greeting); err != nil {
				last = err
				break
			}
		}
		if last == nil {
			return nil
		}
		select {
		case <-s.exited:
			return fmt.Errorf("dovecot exited: %v (last check: %w)", s.cmd.ProcessState, last)
		case <-ctx.Done():
			return fmt.Errorf("not ready within %s: %w", readyTimeout, last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func greets(addr, want string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("greeting from %s: %w", addr, err)
	}
	if !strings.HasPrefix(line, want) {
		return fmt.Errorf("greeting from %s: %q", addr, strings.TrimSpace(line))
	}
	return nil
}

// Stop stops Dovecot and waits until none of its processes is left
// (SIGTERM to the master, which ends its children; SIGKILL to what
// remains after a bounded wait), then removes its base_dir. Calling it
// again does nothing.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() { s.stopErr = s.stop() })
	return s.stopErr
}

func (s *Server) stop() error {
	// The master and its children are one process group (Setpgid).
	pgid := s.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		s.logger.Warn("private dovecot: master still running 10s after SIGTERM, killing it", "pid", pgid)
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-s.exited
	}
	// Children may outlive the master by a few seconds.
	deadline := time.Now().Add(5 * time.Second)
	for s.groupAlive(pgid) {
		if time.Now().After(deadline) {
			syscall.Kill(-pgid, syscall.SIGKILL)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	var errs []error
	for end := time.Now().Add(5 * time.Second); s.groupAlive(pgid); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			errs = append(errs, fmt.Errorf("private dovecot: processes of group %d still running after SIGKILL", pgid))
			break
		}
	}
	if err := os.RemoveAll(s.baseDir); err != nil {
		errs = append(errs, fmt.Errorf("private dovecot: remove base_dir: %w", err))
	}
	return errors.Join(errs...)
}

// groupAlive reports whether a process of the group is left (signal 0
// to the group: ESRCH once none is).
func (s *Server) groupAlive(pgid int) bool {
	return syscall.Kill(-pgid, 0) == nil
}

// logTail is the end of Dovecot's log and output, for errors.
func (s *Server) logTail() string {
	var b strings.Builder
	for _, name := range []string{"dovecot.log", "dovecot.out"} {
		data, err := os.ReadFile(filepath.Join(s.dir, name))
		if err != nil || len(data) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > 20 {
			lines = lines[len(lines)-20:]
		}
		fmt.Fprintf(&b, "\n%s:\n  %s", name, strings.Join(lines, "\n  "))
	}
	return b.String()
}

// ownLoopback picks an address in 127.0.0.0/8 (all of it reaches the
// loopback interface on Linux) whose IMAP and LMTP ports are free.
func ownLoopback() (string, error) {
	for range 64 {
		b := make([]byte, 3)
		if _, err := rand.Read(b); err != nil {
			return "", fmt.Errorf("private dovecot: random address: %w", err)
		}
		if b[0] == 0 || b[2] == 0 || b[2] == 255 {
			continue
		}
		host := fmt.Sprintf("127.%d.%d.%d", b[0], b[1], b[2])
		free := true
		for _, p := range []int{imapPort, lmtpPort} {
			ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(p)))
			if err != nil {
				free = false
				break
			}
			ln.Close()
		}
		if free {
			return host, nil
		}
	}
	return "", errors.New("private dovecot: no loopback address with free IMAP and LMTP ports")
}

func lookupUser(name string) (uid, gid int, err error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, 0, fmt.Errorf("private dovecot: look up user %s: %w", name, err)
	}
	if uid, err = strconv.Atoi(u.Uid); err != nil {
		return 0, 0, fmt.Errorf("private dovecot: uid %q of %s: %w", u.Uid, name, err)
	}
	if gid, err = strconv.Atoi(u.Gid); err != nil {
		return 0, 0, fmt.Errorf("private dovecot: gid %q of %s: %w", u.Gid, name, err)
	}
	return uid, gid, nil
}

// traversable adds r-x for group and others to dir and every parent
// that lacks them (only adds bits: /tmp keeps its sticky mode).
func traversable(dir string) error {
	for d := dir; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("private dovecot: %w", err)
		}
		if mode := st.Mode().Perm(); mode&0o055 != 0o055 {
			if err := os.Chmod(d, mode|0o055); err != nil {
				return fmt.Errorf("private dovecot: make %s traversable: %w", d, err)
			}
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

// writeSecret writes a file only uid may read (0600), never readable by
// others even for a moment.
func writeSecret(path, content string, uid, gid int) error {
	os.Remove(path)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("private dovecot: %w", err)
	}
	if err := f.Chown(uid, gid); err != nil {
		f.Close()
		return fmt.Errorf("private dovecot: chown %s: %w", path, err)
	}
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return fmt.Errorf("private dovecot: write %s: %w", path, err)
	}
	return f.Close()
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("private dovecot: random bytes: %w", err)
	}
	return hex.EncodeToString(b), nil
}
