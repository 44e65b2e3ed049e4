package mailstack

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// watchdogScript stops the instance when the process that started it goes
// away without calling Stop (a test binary killed by its -timeout, a demo
// killed with SIGKILL): its stdin is a pipe only the owner holds, so a
// read returns end-of-file then. Stop writes "stop" first, and the script
// then leaves everything alone.
//
// At end-of-file it sends SIGTERM to both masters (each stops its children),
// waits, and kills whatever of the instance is left, found the way
// instancePIDs finds it: Dovecot's process titles, Dovecot's master command
// line, and the marker in Postfix's environment. Each pid file is checked
// against the process it names, so a stale one cannot hit another process.
//
// Arguments: $1 instance id, $2 Dovecot's master.pid, $3 dovecot.conf,
// $4 Postfix's master.pid, $5 the environment marker.
const watchdogScript = `
read cmd || :
[ "$cmd" = stop ] && exit 0
ours() {
	[ -r "/proc/$1/cmdline" ] || return 1
	case "$(tr '\000' ' ' < "/proc/$1/cmdline" 2>/dev/null)" in
	"dovecot-umdc-$ID/"*|"/usr/sbin/dovecot -c $DCONF ") return 0 ;;
	esac
	tr '\000' '\n' < "/proc/$1/environ" 2>/dev/null | grep -qxF "$MARK"
}
ID=$1 DCONF=$3 MARK=$5
for f in "$2" "$4"; do
	[ -f "$f" ] || continue
	pid=$(tr -d ' \n' < "$f")
	[ -n "$pid" ] && ours "$pid" && kill -TERM "$pid" 2>/dev/null
done
sleep 3
for p in /proc/[0-9]*; do
	pid=${p#/proc/}
	ours "$pid" && kill -KILL "$pid" 2>/dev/null
done
exit 0
`

// startWatchdog starts the watchdog of this instance (see watchdogScript).
// It runs in a session of its own, so a terminal's ^C reaches the owner,
// which stops the stack itself, and not the watchdog.
func (s *Stack) startWatchdog() error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("start watchdog: %w", err)
	}
	defer r.Close()
	cmd := exec.Command("/bin/sh", "-c", watchdogScript, "umdc-watchdog",
		s.id, filepath.Join(s.dovecotBaseDir, "master.pid"), s.dovecotConf,
		filepath.Join(s.postfixQueue, "pid", "master.pid"), envMarker+"="+s.id)
	cmd.Stdin = r
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start watchdog: %w", err)
	}
	s.watchdog, s.watchdogPipe = cmd, w
	return nil
}

// stopWatchdog tells the watchdog that Stop has done its work and waits for
// it to exit.
func (s *Stack) stopWatchdog() error {
	if s.watchdog == nil {
		return nil
	}
	_, werr := s.watchdogPipe.Write([]byte("stop\n"))
	s.watchdogPipe.Close()
	err := s.watchdog.Wait()
	s.watchdog = nil
	if err := errors.Join(werr, err); err != nil {
		return fmt.Errorf("stop watchdog: %w", err)
	}
	return nil
}
