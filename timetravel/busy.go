package timetravel

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Holder is a process that has a file open (or its working directory, or a
// memory mapping) under a store path.
type Holder struct {
	PID     int
	Command string // from /proc/PID/comm
	Path    string // the open path
}

// BusyError reports why a store could not be rolled back or a clone not
// destroyed: processes hold files open under Path.
type BusyError struct {
	Path    string
	Holders []Holder // at most maxHolders, in /proc order
}

// maxHolders bounds BusyError.Holders; one busy Dovecot can hold thousands.
const maxHolders = 16

// Error implements error.
func (e *BusyError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s has open files:", e.Path)
	for i, h := range e.Holders {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, " pid %d (%s) %s", h.PID, h.Command, h.Path)
	}
	return b.String()
}

// Unwrap makes errors.Is(err, ErrBusy) true.
func (e *BusyError) Unwrap() error { return ErrBusy }

// checkNotBusy returns a *BusyError if any process, this one included, has
// a file descriptor, working directory, root or memory mapping under one of
// roots. It reads /proc, like fuser(1) and lsof(1); processes it may not
// inspect are skipped, so run as root (or as the mail user) to see them all.
func checkNotBusy(roots ...string) error {
	var clean []string
	for _, r := range roots {
		if r == "" {
			continue
		}
		clean = append(clean, filepath.Clean(r))
	}
	if len(clean) == 0 {
		return nil
	}
	under := func(p string) bool {
		p = strings.TrimSuffix(p, " (deleted)")
		for _, r := range clean {
			if p == r || strings.HasPrefix(p, r+"/") {
				return true
			}
		}
		return false
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("scan /proc for open files: %w", err)
	}
	busy := &BusyError{Path: strings.Join(clean, ", ")}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		for _, path := range openPaths(pid) {
			if !under(path) {
				continue
			}
			if len(busy.Holders) < maxHolders {
				comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
				busy.Holders = append(busy.Holders, Holder{PID: pid, Command: strings.TrimSpace(string(comm)), Path: path})
			}
			break
		}
	}
	if len(busy.Holders) > 0 {
		return busy
	}
	return nil
}

// openPaths lists the paths process pid has open: fds, cwd, root and
// file-backed mappings (Dovecot mmaps its index files).
func openPaths(pid int) []string {
	dir := fmt.Sprintf("/proc/%d", pid)
	var out []string
	for _, l := range []string{"cwd", "root"} {
		if t, err := os.Readlink(filepath.Join(dir, l)); err == nil {
			out = append(out, t)
		}
	}
	fds, _ := os.ReadDir(filepath.Join(dir, "fd"))
	for _, fd := range fds {
		if t, err := os.Readlink(filepath.Join(dir, "fd", fd.Name())); err == nil && strings.HasPrefix(t, "/") {
			out = append(out, t)
		}
	}
	if f, err := os.Open(filepath.Join(dir, "maps")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// address perms offset dev inode pathname
			fields := strings.SplitN(sc.Text(), " ", 6)
			if len(fields) == 6 {
				if p := strings.TrimSpace(fields[5]); strings.HasPrefix(p, "/") {
					out = append(out, p)
				}
			}
		}
		f.Close()
	}
	return out
}
