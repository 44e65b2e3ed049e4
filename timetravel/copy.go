package timetravel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// CopyStore is the portable backend: snapshots are copies of the live tree
// made of hard links and copies (see the rule at copyTree), kept in a
// directory:
//
//	DIR/NAME/        the snapshot's tree
//	DIR/NAME.json    its metadata (seq, created, labels); written last, so
//	                 a snapshot exists exactly when its .json does
//	DIR/.clones/C/   clone C
//	DIR/.tmp-*       trees being built (removed by OpenCopy)
//
// Rollback builds the snapshot's tree beside the live one and swaps the two
// directory entries with renameat2(RENAME_EXCHANGE), which is atomic: after
// a crash the live path holds either the old tree or the new one. Where the
// file system cannot exchange, it falls back to two renames (live → old,
// new → live); a crash between them leaves no live tree, and OpenCopy
// finishes that swap. Not atomic in either case: the old tree's removal
// (leftovers named LIVE.undomail-old-* are removed by OpenCopy), and the
// live path itself must be a plain directory, not a mount point, on the
// same file system as its parent.
//
// Clones share message files with snapshots through hard links but are
// otherwise independent: Destroy never returns ErrInUse, and a clone
// survives the destruction of its snapshot.
type CopyStore struct {
	dir  string
	live string
	log  *slog.Logger
	mu   sync.Mutex
}

var _ Store = (*CopyStore)(nil)

// copyMeta is the content of DIR/NAME.json.
type copyMeta struct {
	Name    string            `json:"name"`
	Created time.Time         `json:"created"`
	Seq     int64             `json:"seq"`
	Labels  map[string]string `json:"labels,omitempty"`
}

// OpenCopy opens (creating dir if needed) a copy store for the live tree at
// livePath, and cleans up after an interrupted Snapshot, Clone or Rollback.
func OpenCopy(dir, livePath string, opt Options) (*CopyStore, error) {
	if dir == "" || livePath == "" {
		return nil, fmt.Errorf("open copy store: snapshot dir (%q) and live path (%q) are both required", dir, livePath)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("open copy store %s: %w", dir, err)
	}
	live, err := filepath.Abs(livePath)
	if err != nil {
		return nil, fmt.Errorf("open copy store %s: %w", livePath, err)
	}
	if live == dir || strings.HasPrefix(dir, live+"/") {
		return nil, fmt.Errorf("open copy store: snapshot dir %s must not be inside the live store %s (it would be rolled back with it)", dir, live)
	}
	s := &CopyStore{dir: dir, live: live, log: opt.logger().With("store", "copy:"+dir)}
	if err := os.MkdirAll(filepath.Join(dir, ".clones"), 0o700); err != nil {
		return nil, fmt.Errorf("open copy store %s: %w", dir, err)
	}
	if err := s.recover(); err != nil {
		return nil, err
	}
	if fi, err := os.Stat(live); err != nil {
		return nil, fmt.Errorf("open copy store %s: live store: %w", dir, err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("open copy store %s: live store %s is not a directory", dir, live)
	}
	return s, nil
}

// recover finishes or cleans up what a crash interrupted.
func (s *CopyStore) recover() error {
	tmps, _ := filepath.Glob(filepath.Join(s.dir, ".tmp-*"))
	for _, t := range tmps {
		s.log.Warn("removing tree left by an interrupted snapshot or clone", "path", t)
		if err := os.RemoveAll(t); err != nil {
			return fmt.Errorf("open copy store %s: remove %s: %w", s.dir, t, err)
		}
	}
	news, _ := filepath.Glob(s.live + ".undomail-new-*")
	olds, _ := filepath.Glob(s.live + ".undomail-old-*")
	if _, err := os.Lstat(s.live); errors.Is(err, fs.ErrNotExist) {
		// Crashed between the two renames of a fallback rollback: the old
		// tree had been moved away, so the rollback was committed.
		for _, n := range news {
			stamp := strings.TrimPrefix(n, s.live+".undomail-new-")
			if _, err := os.Lstat(s.live + ".undomail-old-" + stamp); err != nil {
				continue
			}
			s.log.Warn("finishing interrupted rollback", "path", s.live, "from", n)
			if err := os.Rename(n, s.live); err != nil {
				return fmt.Errorf("open copy store %s: finish interrupted rollback: %w", s.dir, err)
			}
			news, _ = filepath.Glob(s.live + ".undomail-new-*")
			break
		}
	}
	// A user's rollback (RollbackUser) interrupted between its two
	// fallback renames left the user without a directory: finish it.
	userNews, _ := filepath.Glob(s.live + ".undomail-user-new-*")
	for _, n := range userNews {
		rest := strings.TrimPrefix(n, s.live+".undomail-user-new-")
		i := strings.LastIndex(rest, "-")
		if i <= 0 {
			continue
		}
		user := rest[:i]
		if _, err := os.Lstat(filepath.Join(s.live, user)); errors.Is(err, fs.ErrNotExist) {
			if olds, _ := filepath.Glob(s.live + ".undomail-user-old-" + user + "-*"); len(olds) > 0 {
				s.log.Warn("finishing interrupted rollback of a user", "user", user, "from", n)
				if err := os.Rename(n, filepath.Join(s.live, user)); err != nil {
					return fmt.Errorf("open copy store %s: finish interrupted rollback of %s: %w", s.dir, user, err)
				}
			}
		}
	}
	userLeft, _ := filepath.Glob(s.live + ".undomail-user-*")
	olds = append(olds, userLeft...)
	for _, p := range append(news, olds...) {
		s.log.Warn("removing tree left by an interrupted rollback", "path", p)
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("open copy store %s: remove %s: %w", s.dir, p, err)
		}
	}
	return nil
}

// Path returns the live store directory.
func (s *CopyStore) Path() string { return s.live }

// Dir returns the directory holding the snapshots.
func (s *CopyStore) Dir() string { return s.dir }

func (s *CopyStore) metaPath(name string) string { return filepath.Join(s.dir, name+".json") }
func (s *CopyStore) treePath(name string) string { return filepath.Join(s.dir, name) }
func (s *CopyStore) clonePath(name string) string {
	return filepath.Join(s.dir, ".clones", name)
}

// Snapshot copies the live tree to DIR/name and then commits DIR/name.json.
func (s *CopyStore) Snapshot(ctx context.Context, name string, seq int64, labels map[string]string) (Snapshot, error) {
	if err := checkName("snapshot", name); err != nil {
		return Snapshot{}, err
	}
	if strings.HasSuffix(name, ".json") {
		// DIR/NAME would collide with another snapshot's metadata file.
		return Snapshot{}, fmt.Errorf("snapshot name %q: %w (the copy backend reserves the suffix .json)", name, ErrInvalidName)
	}
	if _, err := encodeLabels(labels); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	if err := ctx.Err(); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	for _, p := range []string{s.metaPath(name), s.treePath(name)} {
		if _, err := os.Lstat(p); err == nil {
			return Snapshot{}, fmt.Errorf("snapshot %s: %s: %w", name, p, ErrExists)
		}
	}
	created := time.Now().UTC()
	tmp := filepath.Join(s.dir, ".tmp-"+name+"-"+snapshotStamp(created))
	linked, copied, err := copyTree(s.live, tmp)
	if err != nil {
		_ = os.RemoveAll(tmp)
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	if err := os.Rename(tmp, s.treePath(name)); err != nil {
		_ = os.RemoveAll(tmp)
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	// The tree must be durable before the metadata that declares it done.
	if err := syncFS(s.dir); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	meta := copyMeta{Name: name, Created: created, Seq: seq, Labels: cloneLabels(labels)}
	if err := writeFileAtomic(s.metaPath(name), meta); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	s.log.Info("snapshot taken", "snapshot", name, "seq", seq, "linked", linked, "copied", copied, "duration", time.Since(start))
	return meta.snapshot(), nil
}

func (m copyMeta) snapshot() Snapshot {
	return Snapshot(m)
}

func cloneLabels(l map[string]string) map[string]string {
	if len(l) == 0 {
		return nil
	}
	out := make(map[string]string, len(l))
	for k, v := range l {
		out[k] = v
	}
	return out
}

// writeFileAtomic writes v as JSON to path: temp file, fsync, rename, fsync
// of the directory.
func writeFileAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-meta-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return fsyncDir(filepath.Dir(path))
}

// readMeta reads DIR/name.json; a missing file is ErrNotFound.
func (s *CopyStore) readMeta(name string) (copyMeta, error) {
	b, err := os.ReadFile(s.metaPath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return copyMeta{}, fmt.Errorf("snapshot %s in %s: %w", name, s.dir, ErrNotFound)
	}
	if err != nil {
		return copyMeta{}, fmt.Errorf("snapshot %s: read metadata: %w", name, err)
	}
	var m copyMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return copyMeta{}, fmt.Errorf("snapshot %s: metadata %s is damaged: %w", name, s.metaPath(name), err)
	}
	if m.Name != name {
		return copyMeta{}, fmt.Errorf("snapshot %s: metadata %s names snapshot %q", name, s.metaPath(name), m.Name)
	}
	if fi, err := os.Stat(s.treePath(name)); err != nil || !fi.IsDir() {
		return copyMeta{}, fmt.Errorf("snapshot %s: metadata present but tree %s missing", name, s.treePath(name))
	}
	return m, nil
}

// List returns the snapshots whose metadata is readable, oldest first.
// Damaged ones are logged and left out; Get reports what is wrong with them.
func (s *CopyStore) List(ctx context.Context) ([]Snapshot, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list snapshots in %s: %w", s.dir, err)
	}
	metas, err := filepath.Glob(filepath.Join(s.dir, "*.json"))
	if err != nil {
		return nil, fmt.Errorf("list snapshots in %s: %w", s.dir, err)
	}
	out := []Snapshot{}
	for _, p := range metas {
		name := strings.TrimSuffix(filepath.Base(p), ".json")
		if checkName("snapshot", name) != nil {
			continue
		}
		m, err := s.readMeta(name)
		if err != nil {
			s.log.Warn("skipping damaged snapshot", "snapshot", name, "err", err)
			continue
		}
		out = append(out, m.snapshot())
	}
	sort.SliceStable(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].Name < out[j].Name
	})
	return out, nil
}

// Get returns one snapshot or an error wrapping ErrNotFound.
func (s *CopyStore) Get(ctx context.Context, name string) (Snapshot, error) {
	if err := checkName("snapshot", name); err != nil {
		return Snapshot{}, err
	}
	if err := ctx.Err(); err != nil {
		return Snapshot{}, fmt.Errorf("get snapshot %s: %w", name, err)
	}
	m, err := s.readMeta(name)
	if err != nil {
		return Snapshot{}, err
	}
	return m.snapshot(), nil
}

// Rollback replaces the live tree with a copy of the snapshot, swapping the
// two atomically (see CopyStore).
func (s *CopyStore) Rollback(ctx context.Context, name string) error {
	if err := checkName("snapshot", name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	if _, err := s.readMeta(name); err != nil {
		return fmt.Errorf("rollback %s to %s: %w", s.live, name, err)
	}
	if err := checkNotBusy(s.live); err != nil {
		return fmt.Errorf("rollback %s to %s: %w", s.live, name, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("rollback %s to %s: %w", s.live, name, err)
	}
	stamp := snapshotStamp(time.Now())
	fresh := s.live + ".undomail-new-" + stamp
	linked, copied, err := copyTree(s.treePath(name), fresh)
	if err != nil {
		_ = os.RemoveAll(fresh)
		return fmt.Errorf("rollback %s to %s: %w", s.live, name, err)
	}
	if err := syncFS(fresh); err != nil {
		_ = os.RemoveAll(fresh)
		return fmt.Errorf("rollback %s to %s: %w", s.live, name, err)
	}
	// A process may have opened something while the copy ran.
	if err := checkNotBusy(s.live); err != nil {
		_ = os.RemoveAll(fresh)
		return fmt.Errorf("rollback %s to %s: %w", s.live, name, err)
	}
	old := fresh // after an exchange, fresh names the old tree
	if err := renameExchange(s.live, fresh); err != nil {
		if !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOSYS) {
			_ = os.RemoveAll(fresh)
			return fmt.Errorf("rollback %s to %s: swap in new tree: %w", s.live, name, err)
		}
		s.log.Debug("no atomic exchange here; swapping with two renames", "err", err)
		old = s.live + ".undomail-old-" + stamp
		if err := os.Rename(s.live, old); err != nil {
			_ = os.RemoveAll(fresh)
			return fmt.Errorf("rollback %s to %s: move old tree aside: %w", s.live, name, err)
		}
		if err := os.Rename(fresh, s.live); err != nil {
			return fmt.Errorf("rollback %s to %s: move new tree in (old tree kept at %s, new at %s; OpenCopy finishes this): %w", s.live, name, old, fresh, err)
		}
	}
	if err := fsyncDir(filepath.Dir(s.live)); err != nil {
		return fmt.Errorf("rollback %s to %s: %w", s.live, name, err)
	}
	if err := os.RemoveAll(old); err != nil {
		// The rollback is done; the leftover is removed by OpenCopy.
		s.log.Warn("could not remove the replaced tree", "path", old, "err", err)
	}
	s.log.Info("rolled back", "snapshot", name, "path", s.live, "linked", linked, "copied", copied, "duration", time.Since(start))
	return nil
}

// Clone copies the snapshot to DIR/.clones/cloneName.
func (s *CopyStore) Clone(ctx context.Context, name, cloneName string) (string, error) {
	if err := checkName("snapshot", name); err != nil {
		return "", err
	}
	if err := checkName("clone", cloneName); err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	if _, err := s.readMeta(name); err != nil {
		return "", fmt.Errorf("clone %s as %s: %w", name, cloneName, err)
	}
	dst := s.clonePath(cloneName)
	if _, err := os.Lstat(dst); err == nil {
		return "", fmt.Errorf("clone %s as %s: %s: %w", name, cloneName, dst, ErrExists)
	}
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("clone %s as %s: %w", name, cloneName, err)
	}
	tmp := filepath.Join(s.dir, ".tmp-clone-"+cloneName+"-"+snapshotStamp(time.Now()))
	linked, copied, err := copyTree(s.treePath(name), tmp)
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		_ = os.RemoveAll(tmp)
		return "", fmt.Errorf("clone %s as %s: %w", name, cloneName, err)
	}
	s.log.Info("cloned", "snapshot", name, "clone", cloneName, "path", dst, "linked", linked, "copied", copied, "duration", time.Since(start))
	return dst, nil
}

// DestroyClone removes a clone; a missing clone is not an error.
func (s *CopyStore) DestroyClone(ctx context.Context, cloneName string) error {
	if err := checkName("clone", cloneName); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.clonePath(cloneName)
	if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := checkNotBusy(p); err != nil {
		return fmt.Errorf("destroy clone %s: %w", cloneName, err)
	}
	if err := os.RemoveAll(p); err != nil {
		return fmt.Errorf("destroy clone %s: %w", cloneName, err)
	}
	s.log.Info("clone destroyed", "clone", cloneName)
	return nil
}

// Destroy removes a snapshot: first its metadata (after which it no longer
// exists), then its tree. A missing snapshot is not an error.
func (s *CopyStore) Destroy(ctx context.Context, name string) error {
	if err := checkName("snapshot", name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	err := os.Remove(s.metaPath(name))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("destroy snapshot %s: %w", name, err)
	default:
		if err := fsyncDir(s.dir); err != nil {
			return fmt.Errorf("destroy snapshot %s: %w", name, err)
		}
	}
	if err := os.RemoveAll(s.treePath(name)); err != nil {
		return fmt.Errorf("destroy snapshot %s: remove tree: %w", name, err)
	}
	s.log.Info("snapshot destroyed", "snapshot", name)
	return nil
}

// RollbackUser makes LIVE/<user> identical to the snapshot's <user>
// directory and leaves every other user's mail as it is: a cycle for one
// user (UserRollbacker). A user without a directory in the snapshot had
// no mail then: their live directory is removed. Errors are as for
// Rollback.
func (s *CopyStore) RollbackUser(ctx context.Context, name, user string) error {
	if err := checkName("snapshot", name); err != nil {
		return err
	}
	if user == "" || user == "." || user == ".." || strings.ContainsAny(user, "/\x00") || strings.HasPrefix(user, ".") {
		return fmt.Errorf("rollback user %q: %w", user, ErrInvalidName)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	if _, err := s.readMeta(name); err != nil {
		return fmt.Errorf("rollback %s of %s to %s: %w", user, s.live, name, err)
	}
	live := filepath.Join(s.live, user)
	if err := checkNotBusy(live); err != nil {
		return fmt.Errorf("rollback %s to %s: %w", live, name, err)
	}
	src := filepath.Join(s.treePath(name), user)
	stamp := snapshotStamp(time.Now())
	aside := s.live + ".undomail-user-old-" + user + "-" + stamp
	if _, err := os.Lstat(src); errors.Is(err, fs.ErrNotExist) {
		// No mail at the snapshot: the user's directory goes.
		if err := os.Rename(live, aside); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("rollback %s to %s: %w", live, name, err)
		}
		_ = os.RemoveAll(aside)
		s.log.Info("rolled back user", "snapshot", name, "user", user, "path", live, "removed", true, "duration", time.Since(start))
		return fsyncDir(s.live)
	}
	fresh := s.live + ".undomail-user-new-" + user + "-" + stamp
	linked, copied, err := copyTree(src, fresh)
	if err == nil {
		err = syncFS(fresh)
	}
	if err == nil {
		err = checkNotBusy(live)
	}
	if err != nil {
		_ = os.RemoveAll(fresh)
		return fmt.Errorf("rollback %s to %s: %w", live, name, err)
	}
	if _, err := os.Lstat(live); errors.Is(err, fs.ErrNotExist) {
		err = os.Rename(fresh, live)
		if err != nil {
			_ = os.RemoveAll(fresh)
			return fmt.Errorf("rollback %s to %s: %w", live, name, err)
		}
	} else {
		old := fresh // after an exchange, fresh names the old tree
		if err := renameExchange(live, fresh); err != nil {
			if !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOSYS) {
				_ = os.RemoveAll(fresh)
				return fmt.Errorf("rollback %s to %s: swap in new tree: %w", live, name, err)
			}
			old = aside
			if err := os.Rename(live, old); err != nil {
				_ = os.RemoveAll(fresh)
				return fmt.Errorf("rollback %s to %s: move old tree aside: %w", live, name, err)
			}
			if err := os.Rename(fresh, live); err != nil {
				return fmt.Errorf("rollback %s to %s: move new tree in (old tree kept at %s, new at %s; OpenCopy finishes this): %w", live, name, old, fresh, err)
			}
		}
		if err := os.RemoveAll(old); err != nil {
			s.log.Warn("could not remove the replaced tree", "path", old, "err", err)
		}
	}
	if err := fsyncDir(s.live); err != nil {
		return fmt.Errorf("rollback %s to %s: %w", live, name, err)
	}
	s.log.Info("rolled back user", "snapshot", name, "user", user, "path", live, "linked", linked, "copied", copied, "duration", time.Since(start))
	return nil
}
