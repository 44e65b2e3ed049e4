package timetravel

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"
	"unsafe"
)

// The copy backend's rule for what may be shared between the live store, a
// snapshot and a clone:
//
//   - A regular file directly inside a maildir's cur/ or new/ directory
//     (a directory named cur or new whose parent also has cur, new and tmp)
//     is a message file. Maildir never changes a message file in place:
//     delivery writes it in tmp/ and renames it into new/, and flag changes
//     rename it within cur/ (https://cr.yp.to/proc/maildir.html). Message
//     files are HARD-LINKED, which is what makes snapshots of large stores
//     cheap.
//   - Every other file is COPIED: Dovecot rewrites dovecot.index*,
//     dovecot-uidlist, dovecot-keywords, dovecot.list.index*, subscriptions
//     and the like in place, and tmp/ holds deliveries being written.
//     Copies try a reflink (FICLONE) first and fall back to copying bytes.
//
// Consequences: changing a message file's bytes or metadata in place
// (chmod, touch, an editor writing over it) would change it in every tree
// that links it. Dovecot never does; neither may a drill. If the snapshot
// directory is on another file system than the live store, links fail with
// EXDEV and message files are copied too.

// ficlone is the FICLONE ioctl request (linux/fs.h: _IOW(0x94, 9, int)).
const ficlone = 0x40049409

// treeCopier copies a directory tree by the rule above.
type treeCopier struct {
	maildirCache map[string]bool
	linked       int
	copied       int
}

// copyTree recreates src at dst, which must not exist. Ownership, modes and
// modification times are kept (directory times too: Dovecot compares a
// maildir's cur/ and new/ mtimes to decide whether to rescan). It does not
// fsync; callers syncfs once at the end.
func copyTree(src, dst string) (linked, copied int, err error) {
	tc := &treeCopier{maildirCache: map[string]bool{}}
	type dirTimes struct {
		path  string
		mode  fs.FileMode
		atime time.Time
		mtime time.Time
	}
	var dirs []dirTimes
	// A file can vanish between listing its directory and copying it:
	// Dovecot creates and removes lock and temporary files on its own
	// (dovecot-uidlist.lock, tmp/), even while undomail holds every change
	// back. What is gone was not part of the mail, so it is skipped.
	gone := func(err error) bool { return errors.Is(err, fs.ErrNotExist) }
	err = filepath.WalkDir(src, func(path string, d fs.DirEntry, walkErr error) error {
		if walkErr != nil {
			if gone(walkErr) && path != src {
				return nil
			}
			return walkErr
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if gone(err) {
			return nil
		}
		if err != nil {
			return err
		}
		st, _ := info.Sys().(*syscall.Stat_t)
		switch mode := info.Mode(); {
		case mode.IsDir():
			if err := os.Mkdir(target, mode.Perm()|0o700); err != nil {
				return err
			}
			if err := chown(target, st); err != nil {
				return err
			}
			dirs = append(dirs, dirTimes{target, mode, atime(st), info.ModTime()})
		case mode.IsRegular():
			if tc.isMessage(path) {
				err := os.Link(path, target)
				if err == nil {
					tc.linked++
					return nil
				}
				if gone(err) {
					return nil
				}
				if !errors.Is(err, syscall.EXDEV) && !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.EMLINK) {
					return err
				}
			}
			if err := copyFile(path, target, info, st); err != nil {
				if gone(err) {
					os.Remove(target)
					return nil
				}
				return err
			}
			tc.copied++
		case mode&fs.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
			if st != nil {
				if err := os.Lchown(target, int(st.Uid), int(st.Gid)); err != nil {
					return err
				}
			}
		default:
			return fmt.Errorf("%s: unsupported file type %v in mail store", path, mode.Type())
		}
		return nil
	})
	if err != nil {
		return tc.linked, tc.copied, fmt.Errorf("copy tree %s to %s: %w", src, dst, err)
	}
	// Children first: creating an entry changes its parent's mtime.
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		if err := os.Chtimes(d.path, d.atime, d.mtime); err != nil {
			return tc.linked, tc.copied, fmt.Errorf("copy tree %s to %s: %w", src, dst, err)
		}
		// Mkdir applied the umask and forced owner rwx; set the exact mode.
		if err := os.Chmod(d.path, d.mode&(fs.ModePerm|fs.ModeSetgid|fs.ModeSticky)); err != nil {
			return tc.linked, tc.copied, fmt.Errorf("copy tree %s to %s: %w", src, dst, err)
		}
	}
	return tc.linked, tc.copied, nil
}

// isMessage reports whether path is a message file: a regular file directly
// inside cur/ or new/ of a maildir.
func (tc *treeCopier) isMessage(path string) bool {
	dir := filepath.Dir(path)
	if b := filepath.Base(dir); b != "cur" && b != "new" {
		return false
	}
	if v, ok := tc.maildirCache[dir]; ok {
		return v
	}
	md := filepath.Dir(dir)
	v := true
	for _, sub := range []string{"cur", "new", "tmp"} {
		if fi, err := os.Stat(filepath.Join(md, sub)); err != nil || !fi.IsDir() {
			v = false
			break
		}
	}
	tc.maildirCache[dir] = v
	return v
}

// copyFile copies a regular file, by reflink if the file system can.
func copyFile(src, dst string, info fs.FileInfo, st *syscall.Stat_t) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, info.Mode().Perm())
	if err != nil {
		return err
	}
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, out.Fd(), ficlone, in.Fd())
	if errno != 0 {
		// EOPNOTSUPP, EXDEV, EINVAL, ENOTTY...: no reflinks here. io.Copy
		// uses copy_file_range, which still avoids a trip through userspace.
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
	}
	if err := out.Chmod(info.Mode().Perm()); err != nil {
		out.Close()
		return err
	}
	if st != nil {
		if err := out.Chown(int(st.Uid), int(st.Gid)); err != nil {
			out.Close()
			return err
		}
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chtimes(dst, atime(st), info.ModTime())
}

func chown(path string, st *syscall.Stat_t) error {
	if st == nil {
		return nil
	}
	return os.Lchown(path, int(st.Uid), int(st.Gid))
}

func atime(st *syscall.Stat_t) time.Time {
	if st == nil {
		return time.Now()
	}
	return time.Unix(st.Atim.Sec, st.Atim.Nsec)
}

// syncFS flushes the whole file system holding path (syncfs(2)): one call
// instead of an fsync per copied file and directory.
func syncFS(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("syncfs %s: %w", path, err)
	}
	defer f.Close()
	nr, ok := sysSyncfs[runtime.GOARCH]
	if !ok {
		// No syncfs number known here: fall back to a global sync(2).
		syscall.Sync()
		return nil
	}
	if _, _, errno := syscall.Syscall(nr, f.Fd(), 0, 0); errno != 0 {
		return fmt.Errorf("syncfs %s: %w", path, errno)
	}
	return nil
}

// fsyncDir makes renames and removals in dir durable.
func fsyncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	return nil
}

// renameExchange atomically swaps the directory entries a and b
// (renameat2(2) with RENAME_EXCHANGE). It returns an error wrapping
// syscall.EINVAL or syscall.ENOSYS where the kernel or file system cannot.
func renameExchange(a, b string) error {
	const renameExchangeFlag = 1 << 1
	pa, err := syscall.BytePtrFromString(a)
	if err != nil {
		return err
	}
	pb, err := syscall.BytePtrFromString(b)
	if err != nil {
		return err
	}
	nr, ok := sysRenameat2[runtime.GOARCH]
	if !ok {
		return &os.LinkError{Op: "renameat2 exchange", Old: a, New: b, Err: syscall.ENOSYS}
	}
	_, _, errno := syscall.Syscall6(nr, uintptr(atFDCWD), uintptr(unsafe.Pointer(pa)),
		uintptr(atFDCWD), uintptr(unsafe.Pointer(pb)), renameExchangeFlag, 0)
	if errno != 0 {
		return &os.LinkError{Op: "renameat2 exchange", Old: a, New: b, Err: errno}
	}
	return nil
}

// sysRenameat2 is the renameat2 system call number; package syscall does
// not define it.
var sysRenameat2 = map[string]uintptr{"amd64": 316, "arm64": 276, "riscv64": 276, "386": 353, "arm": 382}

// sysSyncfs is the syncfs system call number; package syscall does not
// define it.
var sysSyncfs = map[string]uintptr{"amd64": 306, "arm64": 267, "riscv64": 267, "386": 344, "arm": 373}

// atFDCWD is AT_FDCWD as an int so the uintptr conversion sign-extends.
var atFDCWD = -100
