package undolog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"
)

// These tests need root to mount file systems; they skip elsewhere.

func run(t *testing.T, name string, args ...string) error {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// mountTmpfs mounts a tmpfs of the given size and unmounts it at cleanup.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root to mount a tmpfs: run the tests as root (CI does)")
	}
	mnt := t.TempDir()
	if err := run(t, "mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", mnt); err != nil {
		t.Fatalf("cannot mount tmpfs: %v", err)
	}
	t.Cleanup(func() { run(t, "umount", "-l", mnt) })
	return mnt
}

// fill writes a file until the file system is full.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatalf("create filler: %v", err)
	}
	defer f.Close()
	chunk := make([]byte, 64<<10)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("fill: %v", err)
			}
			return
		}
	}
}

func TestDiskFull(t *testing.T) {
	mnt := mountTmpfs(t, "2m")
	dir := filepath.Join(mnt, "log")
	l := openTest(t, dir)
	ctx := context.Background()
	ref, err := storeBlob(l, []byte("before the disk filled up"))
	if err != nil {
		t.Fatalf("storeBlob: %v", err)
	}
	before := appendRec(t, l, Record{Kind: "lmtp.deliver", Blob: ref.SHA256})

	filler := filepath.Join(mnt, "filler")
	fill(t, filler)

	// A verb with a message: storing the blob fails first.
	if _, err := storeBlob(l, bytes.Repeat([]byte("x"), 256<<10)); !errors.Is(err, ErrFull) {
		t.Fatalf("storeBlob on a full disk = %v, want ErrFull", err)
	}
	// A verb without one: SQLite cannot grow the WAL.
	big := json.RawMessage(`"` + strings.Repeat("a", 256<<10) + `"`)
	r := Record{Kind: "imap.append", Args: big}
	err = l.Append(ctx, &r)
	if !errors.Is(err, ErrFull) {
		t.Fatalf("Append on a full disk = %v, want ErrFull", err)
	}
	var fe *FailedError
	if errors.As(err, &fe) {
		t.Fatalf("disk full failed the log (sticky): %v", err)
	}
	if seq, sum := l.Last(); seq != before.Seq || sum != before.Sum {
		t.Fatalf("failed commit moved the head to %d", seq)
	}
	if r.Seq != 0 {
		t.Fatalf("failed Append assigned seq %d to the caller's record", r.Seq)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatalf("remove filler: %v", err)
	}
	ref2, err := storeBlob(l, bytes.Repeat([]byte("x"), 256<<10))
	if err != nil {
		t.Fatalf("storeBlob after freeing space: %v", err)
	}
	after := appendRec(t, l, Record{Kind: "lmtp.deliver", Blob: ref2.SHA256, Args: big})
	if after.Seq != before.Seq+1 || after.PrevSum != before.Sum {
		t.Fatalf("after freeing space: seq %d, want %d linked to the last good record", after.Seq, before.Seq+1)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	checkClean(t, dir)
}

// snapshotFiles maps every file under dir to its content hash.
func snapshotFiles(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	m := make(map[string][32]byte)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		m[p] = sha256.Sum256(b)
		return err
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	return m
}

func TestReadOnlyFileSystem(t *testing.T) {
	mnt := mountTmpfs(t, "8m")
	dir := filepath.Join(mnt, "log")
	l := openTest(t, dir)
	ref, err := storeBlob(l, []byte("a message"))
	if err != nil {
		t.Fatalf("storeBlob: %v", err)
	}
	last := appendRec(t, l, Record{Kind: "lmtp.deliver", Blob: ref.SHA256})

	t.Run("blob store read-only while open", func(t *testing.T) {
		// Linux refuses to remount a file system read-only while files on it
		// are open for writing, as SQLite's are. A read-only bind mount over
		// the blob store gives the same EROFS to the open log.
		blobs := filepath.Join(dir, blobsName)
		if err := run(t, "mount", "--bind", blobs, blobs); err != nil {
			t.Fatalf("bind mount: %v", err)
		}
		bound := true
		unbind := func() {
			if bound {
				run(t, "umount", "-l", blobs)
				bound = false
			}
		}
		t.Cleanup(unbind)
		if err := run(t, "mount", "-o", "remount,bind,ro", blobs); err != nil {
			t.Fatalf("remount blob store read-only: %v", err)
		}
		if _, err := storeBlob(l, []byte("another message")); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("storeBlob on a read-only store = %v, want ErrUnavailable", err)
		}
		unbind()
		ref2, err := storeBlob(l, []byte("another message"))
		if err != nil {
			t.Fatalf("storeBlob once writable again (ErrUnavailable must not be sticky): %v", err)
		}
		last = appendRec(t, l, Record{Kind: "lmtp.deliver", Blob: ref2.SHA256})
	})

	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	before := snapshotFiles(t, dir)
	if err := run(t, "mount", "-o", "remount,ro", mnt); err != nil {
		t.Fatalf("remount read-only: %v", err)
	}
	l2, err := Open(dir, testOptions(t))
	if err == nil {
		l2.Close()
		t.Fatalf("Open on a read-only file system succeeded")
	}
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Open on a read-only file system = %v, want ErrUnavailable", err)
	}
	t.Logf("Open on read-only fs: %v", err)
	// fsck still works on a read-only copy.
	checkClean(t, dir)

	if err := run(t, "mount", "-o", "remount,rw", mnt); err != nil {
		t.Fatalf("remount read-write: %v", err)
	}
	after := snapshotFiles(t, dir)
	for p, h := range before {
		if after[p] != h {
			t.Fatalf("%s changed while the file system was read-only", p)
		}
	}
	if len(after) != len(before) {
		t.Fatalf("files appeared while the file system was read-only: %d before, %d after", len(before), len(after))
	}
	l3 := openTest(t, dir)
	if seq, sum := l3.Last(); seq != last.Seq || sum != last.Sum {
		t.Fatalf("after remount rw: Last() = %d, want %d", seq, last.Seq)
	}
	if r := appendRec(t, l3, Record{Kind: "imap.store"}); r.Seq != last.Seq+1 {
		t.Fatalf("append after remount rw: seq %d, want %d", r.Seq, last.Seq+1)
	}
}

// TestIOErrorFailsLog shuts down an ext4 file system under an open log
// (EXT4_IOC_SHUTDOWN, as after a dying disk): every write now fails with EIO.
// The log must fail and stay failed.
func TestIOErrorFailsLog(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root for a loop-mounted ext4: run the tests as root (CI does)")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Fatal("mkfs.ext4 not installed (Debian package e2fsprogs; CI installs it)")
	}
	img := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	if err := run(t, "mkfs.ext4", "-q", img); err != nil {
		t.Fatalf("mkfs: %v", err)
	}
	mnt := t.TempDir()
	if err := run(t, "mount", "-o", "loop", img, mnt); err != nil {
		t.Fatalf("loop mount: %v", err)
	}
	t.Cleanup(func() { run(t, "umount", "-l", mnt) })

	dir := filepath.Join(mnt, "log")
	l := openTest(t, dir)
	appendRec(t, l, Record{Kind: "imap.store"})

	f, err := os.Open(mnt)
	if err != nil {
		t.Fatal(err)
	}
	// EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32); 2 = EXT4_GOING_FLAGS_NOLOGFLUSH.
	flags := uint32(2)
	const ext4IocShutdown = 0x8004587d
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), ext4IocShutdown, uintptr(unsafe.Pointer(&flags)))
	f.Close()
	if errno != 0 {
		t.Fatalf("EXT4_IOC_SHUTDOWN: %v", errno)
	}

	err = l.Append(context.Background(), &Record{Kind: "imap.store"})
	var fe *FailedError
	if !errors.Is(err, ErrUnavailable) || !errors.As(err, &fe) {
		t.Fatalf("Append after an I/O error = %v, want a FailedError wrapping ErrUnavailable", err)
	}
	t.Logf("first failure: %v", err)
	err2 := l.Append(context.Background(), &Record{Kind: "imap.store"})
	if !errors.Is(err2, ErrUnavailable) || !strings.Contains(err2.Error(), fe.Cause.Error()) {
		t.Fatalf("next Append = %v, want ErrUnavailable naming the original cause %q", err2, fe.Cause)
	}
	if seq, _ := l.Last(); seq != 1 {
		t.Fatalf("head moved to %d", seq)
	}
}
