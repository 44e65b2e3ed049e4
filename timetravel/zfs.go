package timetravel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	gozfs "github.com/mistifyio/go-zfs/v3"
)

// ZFS user properties and dataset name infixes the zfs backend uses.
const (
	// PropSeq holds a snapshot's undo-log position.
	PropSeq = "undomail:seq"
	// PropLabels holds a snapshot's labels as JSON.
	PropLabels = "undomail:labels"
	// PropCreated holds when undomail took a snapshot (RFC 3339, ns); the
	// native creation property has only seconds.
	PropCreated = "undomail:created"
	// PropBranchOf marks a branch dataset: the store-relative path ("." for
	// the whole store, "alice" for user alice) whose history it carries.
	PropBranchOf = "undomail:branch-of"

	branchInfix = ".undomail-branch-"
	newInfix    = ".undomail-new-"
	cloneInfix  = ".undomail-clone-"
)

// ZFSStore is the zfs backend. The store is one dataset, POOL/.../NAME
// (not a pool's root dataset), optionally with child datasets, e.g. one per
// user. Snapshot takes a recursive snapshot (zfs snapshot -r) with the seq,
// labels and time as user properties set in the same command, so a
// snapshot never exists without them.
//
// # Rollback keeps newer snapshots
//
// "zfs rollback" can only return to the newest snapshot, or destroy the
// newer ones with -r. Rollback instead builds the new live tree from clones
// and swaps it in, so every snapshot survives:
//
//  1. clone each dataset's snapshot into PARENT/NAME.undomail-new-STAMP
//     (mountpoint=none, so nothing is visible yet);
//  2. promote each clone until it has no origin: it then owns the
//     snapshot and all older ones;
//  3. unmount the live dataset (mountpoint=none) and rename it to
//     PARENT/NAME.undomail-branch-STAMP: a branch, which keeps the
//     snapshots newer than the one rolled back to;
//  4. rename the clone to the live name and restore its mountpoint.
//
// List, Get, Clone and Rollback find snapshots on the live dataset and on
// all branches (branches are marked with the user property
// undomail:branch-of). A branch left without snapshots is destroyed, since
// nothing can reach it. While a branch exists its origin, the snapshot
// rolled back to, cannot be destroyed: Destroy returns ErrInUse until the
// newer snapshots on the branch are destroyed.
//
// Steps 3 and 4 are not atomic. If the process dies between them there is
// no dataset at the live name; finish by hand with
// "zfs rename PARENT/NAME.undomail-new-STAMP POOL/.../NAME" and
// "zfs inherit mountpoint POOL/.../NAME" (or set it as it was). A new mount
// also means the kernel holds no stale FUSE/page cache of the old tree.
//
// Renaming a dataset makes ZFS remount the clones of its snapshots, and
// zfs-fuse cannot remount a clone with mounted children, so Rollback
// unmounts the store's clones (Clone's drills) around the swap
// (mountpoint=none, then restored). A drill with files open in its clone
// therefore blocks a rollback with ErrBusy.
//
// zfs-fuse unmounts asynchronously and answers "dataset is busy" to a
// destroy or rename for a moment afterwards; those calls are retried for a
// few seconds (see retryBusy).
//
// Child datasets with a local (not inherited) mountpoint are not supported.
type ZFSStore struct {
	dataset  string // POOL/.../NAME
	parent   string // POOL/...
	base     string // NAME
	mount    string
	cloneDir string
	r        *zfsRunner
	log      *slog.Logger
	mu       sync.Mutex
}

var (
	_ Store          = (*ZFSStore)(nil)
	_ UserRollbacker = (*ZFSStore)(nil)
	_ UserRollbacker = (*CopyStore)(nil)
)

// OpenZFS opens the store on an existing, mounted ZFS file system dataset.
func OpenZFS(ctx context.Context, dataset string, opt Options) (*ZFSStore, error) {
	parent, base, ok := cutLast(dataset, "/")
	if !ok || parent == "" || base == "" || strings.ContainsAny(dataset, "@# ") {
		return nil, fmt.Errorf("open zfs store %q: want POOL/DATASET (not a pool's root dataset, which cannot be renamed)", dataset)
	}
	log := opt.logger().With("store", "zfs:"+dataset)
	s := &ZFSStore{
		dataset: dataset, parent: parent, base: base,
		cloneDir: opt.CloneDir,
		r:        &zfsRunner{log: log, timeout: opt.timeout()},
		log:      log,
	}
	var ds *gozfs.Dataset
	err := s.r.lib(ctx, "list "+dataset, func() (err error) {
		ds, err = gozfs.GetDataset(dataset)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open zfs store %s: %w", dataset, err)
	}
	if ds.Type != gozfs.DatasetFilesystem {
		return nil, fmt.Errorf("open zfs store %s: is a %s, want a filesystem", dataset, ds.Type)
	}
	if !filepath.IsAbs(ds.Mountpoint) {
		return nil, fmt.Errorf("open zfs store %s: mountpoint is %q, want a path", dataset, ds.Mountpoint)
	}
	s.mount = ds.Mountpoint
	if opt.LivePath != "" && filepath.Clean(opt.LivePath) != s.mount {
		return nil, fmt.Errorf("open zfs store %s: configured live path %s but the dataset is mounted at %s", dataset, opt.LivePath, s.mount)
	}
	return s, nil
}

func cutLast(s, sep string) (before, after string, found bool) {
	if i := strings.LastIndex(s, sep); i >= 0 {
		return s[:i], s[i+len(sep):], true
	}
	return "", s, false
}

// Path returns the live dataset's mountpoint.
func (s *ZFSStore) Path() string { return s.mount }

// Dataset returns the live dataset's name.
func (s *ZFSStore) Dataset() string { return s.dataset }

// zds is one dataset (file system or snapshot) as read by inventory.
type zds struct {
	name, typ, origin, mountpoint string
	branchOf                      string // "" if unset
	createtxg                     uint64
	creation                      int64
	seq                           int64
	labels, created               string
}

// zinv is every dataset below the store's parent, read in one zfs call.
type zinv struct {
	ds    map[string]*zds
	order []string
}

// inventory reads the properties the backend needs of every dataset and
// snapshot below the parent of the store.
func (s *ZFSStore) inventory(ctx context.Context) (*zinv, error) {
	lines, err := s.r.run(ctx, "get", "-Hp", "-r", "-o", "name,property,value",
		strings.Join([]string{"type", "origin", "mountpoint", "createtxg", "creation", PropSeq, PropLabels, PropCreated, PropBranchOf}, ","),
		s.parent)
	if err != nil {
		return nil, fmt.Errorf("list datasets below %s: %w", s.parent, err)
	}
	inv := &zinv{ds: map[string]*zds{}}
	for _, l := range lines {
		f := strings.SplitN(l, "\t", 3)
		if len(f) != 3 {
			return nil, fmt.Errorf("list datasets below %s: unexpected zfs get line %q", s.parent, l)
		}
		d := inv.ds[f[0]]
		if d == nil {
			d = &zds{name: f[0], seq: NoSeq}
			inv.ds[f[0]] = d
			inv.order = append(inv.order, f[0])
		}
		v := f[2]
		if v == "-" {
			continue
		}
		switch f[1] {
		case "type":
			d.typ = v
		case "origin":
			d.origin = v
		case "mountpoint":
			d.mountpoint = v
		case "createtxg":
			d.createtxg, _ = strconv.ParseUint(v, 10, 64)
		case "creation":
			d.creation, _ = strconv.ParseInt(v, 10, 64)
		case PropSeq:
			if n, err := strconv.ParseInt(v, 10, 64); err == nil {
				d.seq = n
			} else {
				s.log.Warn("snapshot has an unparsable seq", "dataset", d.name, "value", v)
			}
		case PropLabels:
			d.labels = v
		case PropCreated:
			d.created = v
		case PropBranchOf:
			d.branchOf = v
		}
	}
	return inv, nil
}

// rel returns the store-relative path whose history file system fs holds
// ("" for the store itself), and whether fs belongs to the store at all:
// the live dataset and its children, and branches with their children.
func (s *ZFSStore) rel(inv *zinv, fs string) (string, bool) {
	if fs == s.dataset {
		return "", true
	}
	if sub, ok := strings.CutPrefix(fs, s.dataset+"/"); ok {
		return sub, true
	}
	rest, ok := strings.CutPrefix(fs, s.parent+"/")
	if !ok {
		return "", false
	}
	top, sub, _ := strings.Cut(rest, "/")
	if !strings.HasPrefix(top, s.base+branchInfix) && !strings.HasPrefix(top, s.base+newInfix) {
		return "", false
	}
	root := inv.ds[s.parent+"/"+top]
	if root == nil || root.branchOf == "" {
		return "", false
	}
	b := root.branchOf
	if b == "." {
		b = ""
	}
	return path.Join(b, sub), true
}

// snapshotsNamed returns, by store-relative path, the snapshots called
// name in the store's history.
func (s *ZFSStore) snapshotsNamed(inv *zinv, name string) (map[string]*zds, error) {
	out := map[string]*zds{}
	for _, n := range inv.order {
		d := inv.ds[n]
		fs, snap, ok := strings.Cut(n, "@")
		if !ok || snap != name {
			continue
		}
		r, ok := s.rel(inv, fs)
		if !ok {
			continue
		}
		if prev := out[r]; prev != nil {
			return nil, fmt.Errorf("snapshot %s: both %s and %s claim to be %q of the store", name, prev.name, n, r)
		}
		out[r] = d
	}
	return out, nil
}

// toSnapshot converts a snapshot's properties.
func (s *ZFSStore) toSnapshot(d *zds) Snapshot {
	_, name, _ := strings.Cut(d.name, "@")
	sn := Snapshot{Name: name, Seq: d.seq, Created: time.Unix(d.creation, 0).UTC()}
	if d.created != "" {
		if t, err := time.Parse(time.RFC3339Nano, d.created); err == nil {
			sn.Created = t
		}
	}
	if d.labels != "" {
		if err := json.Unmarshal([]byte(d.labels), &sn.Labels); err != nil {
			s.log.Warn("snapshot has unparsable labels", "dataset", d.name, "err", err)
		}
	}
	return sn
}

// Snapshot takes a recursive snapshot of the store with seq, labels and the
// time as user properties, in one zfs command.
func (s *ZFSStore) Snapshot(ctx context.Context, name string, seq int64, labels map[string]string) (Snapshot, error) {
	if err := checkName("snapshot", name); err != nil {
		return Snapshot{}, err
	}
	lj, err := encodeLabels(labels)
	if err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	inv, err := s.inventory(ctx)
	if err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	snaps, err := s.snapshotsNamed(inv, name)
	if err != nil {
		return Snapshot{}, err
	}
	if len(snaps) > 0 {
		return Snapshot{}, fmt.Errorf("snapshot %s of %s: %w", name, s.dataset, ErrExists)
	}
	created := time.Now().UTC()
	args := []string{"snapshot", "-r",
		"-o", PropSeq + "=" + strconv.FormatInt(seq, 10),
		"-o", PropCreated + "=" + created.Format(time.RFC3339Nano)}
	if lj != "" {
		args = append(args, "-o", PropLabels+"="+lj)
	}
	if _, err := s.r.run(ctx, append(args, s.dataset+"@"+name)...); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s of %s: %w", name, s.dataset, err)
	}
	s.log.Info("snapshot taken", "snapshot", name, "seq", seq, "duration", time.Since(start))
	return Snapshot{Name: name, Created: created, Seq: seq, Labels: cloneLabels(labels)}, nil
}

// List returns the store's snapshots, on the live dataset and on branches,
// oldest (lowest creation txg) first.
func (s *ZFSStore) List(ctx context.Context) ([]Snapshot, error) {
	inv, err := s.inventory(ctx)
	if err != nil {
		return nil, fmt.Errorf("list snapshots of %s: %w", s.dataset, err)
	}
	var ds []*zds
	for _, n := range inv.order {
		fs, _, ok := strings.Cut(n, "@")
		if !ok {
			continue
		}
		if r, ok := s.rel(inv, fs); ok && r == "" {
			ds = append(ds, inv.ds[n])
		}
	}
	sort.SliceStable(ds, func(i, j int) bool { return ds[i].createtxg < ds[j].createtxg })
	out := make([]Snapshot, 0, len(ds))
	for _, d := range ds {
		out = append(out, s.toSnapshot(d))
	}
	return out, nil
}

// Get returns one snapshot or an error wrapping ErrNotFound.
func (s *ZFSStore) Get(ctx context.Context, name string) (Snapshot, error) {
	if err := checkName("snapshot", name); err != nil {
		return Snapshot{}, err
	}
	inv, err := s.inventory(ctx)
	if err != nil {
		return Snapshot{}, fmt.Errorf("get snapshot %s: %w", name, err)
	}
	snaps, err := s.snapshotsNamed(inv, name)
	if err != nil {
		return Snapshot{}, err
	}
	d := snaps[""]
	if d == nil {
		return Snapshot{}, fmt.Errorf("snapshot %s of %s: %w", name, s.dataset, ErrNotFound)
	}
	return s.toSnapshot(d), nil
}

// Rollback makes the live store, children included, identical to the
// snapshot and keeps every snapshot (see ZFSStore).
func (s *ZFSStore) Rollback(ctx context.Context, name string) error {
	if err := checkName("snapshot", name); err != nil {
		return err
	}
	return s.replace(ctx, "", name)
}

// RollbackUser rolls back the child dataset of one user (POOL/.../NAME/user)
// to its part of snapshot name and leaves the rest of the store alone.
func (s *ZFSStore) RollbackUser(ctx context.Context, name, user string) error {
	if err := checkName("snapshot", name); err != nil {
		return err
	}
	if err := checkName("user", user); err != nil {
		return err
	}
	return s.replace(ctx, user, name)
}

// depthOrder sorts store-relative paths parents first.
func depthOrder(rels []string) {
	depth := func(r string) int {
		if r == "" {
			return -1
		}
		return strings.Count(r, "/")
	}
	sort.Slice(rels, func(i, j int) bool {
		if di, dj := depth(rels[i]), depth(rels[j]); di != dj {
			return di < dj
		}
		return rels[i] < rels[j]
	})
}

// under reports whether store-relative path r is rel or below it.
func under(r, rel string) bool {
	return rel == "" || r == rel || strings.HasPrefix(r, rel+"/")
}

// joinDS appends a store-relative sub path to a dataset name.
func joinDS(ds, sub string) string {
	if sub == "" {
		return ds
	}
	return ds + "/" + sub
}

// replace swaps the live dataset at store-relative path rel (and its
// children) for clones of snapshot name; see ZFSStore for the steps.
func (s *ZFSStore) replace(ctx context.Context, rel, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	live := joinDS(s.dataset, rel)
	what := fmt.Sprintf("rollback %s to %s", live, name)
	inv, err := s.inventory(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if d := inv.ds[live]; d == nil || d.typ != gozfs.DatasetFilesystem {
		return fmt.Errorf("%s: no live dataset %s: %w", what, live, ErrNotFound)
	}
	snaps, err := s.snapshotsNamed(inv, name)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if snaps[rel] == nil {
		return fmt.Errorf("%s: %w", what, ErrNotFound)
	}
	var parts []string
	for r := range snaps {
		if under(r, rel) {
			parts = append(parts, r)
		}
	}
	depthOrder(parts)

	var mounts []string
	for _, n := range inv.order {
		d := inv.ds[n]
		if (n == live || strings.HasPrefix(n, live+"/")) && d.typ == gozfs.DatasetFilesystem && filepath.IsAbs(d.mountpoint) {
			mounts = append(mounts, d.mountpoint)
		}
	}
	// Renaming a dataset remounts the clones of its snapshots (drills), and
	// zfs-fuse cannot unmount a clone that has mounted children: unmount
	// them here and mount them again afterwards. A drill that is running
	// (files open in its clone) blocks the rollback.
	clones := s.cloneRoots(inv)
	for _, c := range clones {
		if mp := inv.ds[c].mountpoint; filepath.IsAbs(mp) {
			mounts = append(mounts, mp)
		}
	}
	if err := checkNotBusy(mounts...); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}

	stamp := snapshotStamp(time.Now())
	tmp := s.parent + "/" + s.base + newInfix + stamp
	branch := s.parent + "/" + s.base + branchInfix + stamp
	branchOf := rel
	if branchOf == "" {
		branchOf = "."
	}

	// 1. Clone the snapshot tree, invisible (mountpoint=none) until swapped in.
	for _, r := range parts {
		sub := strings.TrimPrefix(strings.TrimPrefix(r, rel), "/")
		target := joinDS(tmp, sub)
		var props map[string]string
		if sub == "" {
			props = map[string]string{"mountpoint": "none", PropBranchOf: branchOf}
		}
		src := &gozfs.Dataset{Name: snaps[r].name, Type: gozfs.DatasetSnapshot}
		if err := s.r.lib(ctx, "clone "+src.Name+" "+target, func() error {
			_, err := src.Clone(target, props)
			return err
		}); err != nil {
			return fmt.Errorf("%s: clone %s: %w (left %s; it is listed as a branch)", what, src.Name, err, tmp)
		}
	}
	// 2. Promote until each clone owns its history.
	for _, r := range parts {
		sub := strings.TrimPrefix(strings.TrimPrefix(r, rel), "/")
		if err := s.promoteFully(ctx, joinDS(tmp, sub)); err != nil {
			return fmt.Errorf("%s: %w (left %s; it is listed as a branch)", what, err, tmp)
		}
	}
	hidden, err := s.hideClones(ctx, clones)
	if err != nil {
		return fmt.Errorf("%s: %w (left %s; it is listed as a branch)", what, err, tmp)
	}
	defer s.restoreClones(ctx, hidden)
	// 3. Retire the live dataset as a branch.
	mp, err := s.r.run(ctx, "get", "-H", "-o", "value,source", "mountpoint", live)
	if err != nil || len(mp) != 1 {
		return fmt.Errorf("%s: read mountpoint: %w", what, err)
	}
	mpValue, mpSource, _ := strings.Cut(mp[0], "\t")
	steps := [][]string{
		{"set", PropBranchOf + "=" + branchOf, live},
		{"set", "mountpoint=none", live},
		{"rename", live, branch},
		// 4. Put the new tree in its place.
		{"rename", tmp, live},
		{"inherit", PropBranchOf, live},
	}
	for _, st := range steps {
		if err := s.r.runRetryBusy(ctx, st...); err != nil {
			return fmt.Errorf("%s: zfs %s: %w (see ZFSStore doc to finish by hand)", what, strings.Join(st, " "), err)
		}
	}
	if err := s.restoreMountpoint(ctx, savedMountpoint{live, mpValue, mpSource}); err != nil {
		return fmt.Errorf("%s: mount the new tree: %w (see ZFSStore doc to finish by hand)", what, err)
	}
	if err := s.gc(ctx); err != nil {
		s.log.Warn("could not destroy unreachable branches", "err", err)
	}
	s.log.Info("rolled back", "dataset", live, "snapshot", name, "branch", branch, "duration", time.Since(start))
	return nil
}

// promoteFully promotes fs until it is no longer a clone, so that it owns
// every snapshot of its history.
func (s *ZFSStore) promoteFully(ctx context.Context, fs string) error {
	for range 1000 {
		out, err := s.r.run(ctx, "get", "-H", "-o", "value", "origin", fs)
		if err != nil {
			return fmt.Errorf("read origin of %s: %w", fs, err)
		}
		if len(out) == 0 || out[0] == "-" || out[0] == "" {
			return nil
		}
		if _, err := s.r.run(ctx, "promote", fs); err != nil {
			return fmt.Errorf("promote %s: %w", fs, err)
		}
	}
	return fmt.Errorf("promote %s: still a clone after 1000 promotions", fs)
}

// gc destroys branches that hold no snapshot: nothing can reach them.
func (s *ZFSStore) gc(ctx context.Context) error {
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	hasSnap := map[string]bool{}
	for _, n := range inv.order {
		if fs, _, ok := strings.Cut(n, "@"); ok {
			top, _, _ := strings.Cut(strings.TrimPrefix(fs, s.parent+"/"), "/")
			hasSnap[s.parent+"/"+top] = true
		}
	}
	var errs []error
	for _, n := range inv.order {
		rest, ok := strings.CutPrefix(n, s.parent+"/")
		if !ok || inv.ds[n].typ != gozfs.DatasetFilesystem || strings.Contains(rest, "/") || hasSnap[n] {
			continue
		}
		if !strings.HasPrefix(rest, s.base+branchInfix) && !strings.HasPrefix(rest, s.base+newInfix) {
			continue
		}
		d := &gozfs.Dataset{Name: n, Type: gozfs.DatasetFilesystem}
		err := s.destroy(ctx, d, gozfs.DestroyRecursive)
		if err != nil && !errors.Is(err, ErrNotFound) {
			errs = append(errs, fmt.Errorf("destroy empty branch %s: %w", n, err))
			continue
		}
		s.log.Info("destroyed branch without snapshots", "dataset", n)
	}
	return errors.Join(errs...)
}

// Clone clones the snapshot, children included, to
// PARENT/NAME.undomail-clone-CLONENAME, mounted under Options.CloneDir or
// where the parent's mountpoint puts it.
func (s *ZFSStore) Clone(ctx context.Context, name, cloneName string) (string, error) {
	if err := checkName("snapshot", name); err != nil {
		return "", err
	}
	if err := checkName("clone", cloneName); err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	start := time.Now()
	what := fmt.Sprintf("clone %s@%s as %s", s.dataset, name, cloneName)
	inv, err := s.inventory(ctx)
	if err != nil {
		return "", fmt.Errorf("%s: %w", what, err)
	}
	target := s.cloneDataset(cloneName)
	if inv.ds[target] != nil {
		return "", fmt.Errorf("%s: %s: %w", what, target, ErrExists)
	}
	snaps, err := s.snapshotsNamed(inv, name)
	if err != nil {
		return "", fmt.Errorf("%s: %w", what, err)
	}
	if snaps[""] == nil {
		return "", fmt.Errorf("%s: %w", what, ErrNotFound)
	}
	parts := make([]string, 0, len(snaps))
	for r := range snaps {
		parts = append(parts, r)
	}
	depthOrder(parts)
	var root *gozfs.Dataset
	for _, r := range parts {
		var props map[string]string
		if r == "" && s.cloneDir != "" {
			props = map[string]string{"mountpoint": filepath.Join(s.cloneDir, cloneName)}
		}
		src := &gozfs.Dataset{Name: snaps[r].name, Type: gozfs.DatasetSnapshot}
		dst := joinDS(target, r)
		var ds *gozfs.Dataset
		err := s.r.lib(ctx, "clone "+src.Name+" "+dst, func() (err error) {
			ds, err = src.Clone(dst, props)
			return err
		})
		if err != nil {
			if r != "" {
				s.destroyQuietly(ctx, target)
			}
			return "", fmt.Errorf("%s: %w", what, err)
		}
		if r == "" {
			root = ds
		}
	}
	if !filepath.IsAbs(root.Mountpoint) {
		s.destroyQuietly(ctx, target)
		return "", fmt.Errorf("%s: clone would not be mounted (mountpoint %q); set Options.CloneDir", what, root.Mountpoint)
	}
	s.log.Info("cloned", "snapshot", name, "clone", target, "path", root.Mountpoint, "duration", time.Since(start))
	return root.Mountpoint, nil
}

func (s *ZFSStore) cloneDataset(cloneName string) string {
	return s.parent + "/" + s.base + cloneInfix + cloneName
}

func (s *ZFSStore) destroyQuietly(ctx context.Context, ds string) {
	d := &gozfs.Dataset{Name: ds, Type: gozfs.DatasetFilesystem}
	if err := s.destroy(ctx, d, gozfs.DestroyRecursive); err != nil {
		s.log.Warn("could not clean up after failed clone", "dataset", ds, "err", err)
	}
}

// DestroyClone destroys a clone and its children. It refuses with ErrBusy
// while a process has files open in it: destroying a busy dataset can hang
// zfs-fuse.
func (s *ZFSStore) DestroyClone(ctx context.Context, cloneName string) error {
	if err := checkName("clone", cloneName); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	target := s.cloneDataset(cloneName)
	out, err := s.r.run(ctx, "get", "-H", "-o", "value", "mountpoint", target)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("destroy clone %s: %w", target, err)
	}
	if len(out) == 1 && filepath.IsAbs(out[0]) {
		if err := checkNotBusy(out[0]); err != nil {
			return fmt.Errorf("destroy clone %s: %w", target, err)
		}
	}
	// zfs-fuse cannot unmount a file system that has mounted children.
	fss, err := s.r.run(ctx, "list", "-H", "-r", "-t", "filesystem", "-o", "name", target)
	if err != nil {
		return fmt.Errorf("destroy clone %s: %w", target, err)
	}
	sort.Strings(fss)
	if err := s.unmount(ctx, fss); err != nil {
		return fmt.Errorf("destroy clone %s: %w", target, err)
	}
	d := &gozfs.Dataset{Name: target, Type: gozfs.DatasetFilesystem}
	err = s.destroy(ctx, d, gozfs.DestroyRecursive)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("destroy clone %s: %w", target, err)
	}
	s.log.Info("clone destroyed", "clone", target)
	return nil
}

// Destroy destroys the snapshot on every dataset of the store that has it
// (children, and branches). It returns an *InUseError, before destroying
// anything, if a clone or branch depends on one of them.
func (s *ZFSStore) Destroy(ctx context.Context, name string) error {
	if err := checkName("snapshot", name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	what := fmt.Sprintf("destroy snapshot %s@%s", s.dataset, name)
	// Empty branches may depend on the snapshot: collect them first.
	if err := s.gc(ctx); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	inv, err := s.inventory(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	snaps, err := s.snapshotsNamed(inv, name)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if len(snaps) == 0 {
		return nil
	}
	targets := map[string]bool{}
	for _, d := range snaps {
		targets[d.name] = true
	}
	inUse := &InUseError{Snapshot: name}
	for _, n := range inv.order {
		if d := inv.ds[n]; targets[d.origin] {
			inUse.Dependents = append(inUse.Dependents, n)
		}
	}
	if len(inUse.Dependents) > 0 {
		return fmt.Errorf("%s: %w", what, inUse)
	}
	rels := make([]string, 0, len(snaps))
	for r := range snaps {
		rels = append(rels, r)
	}
	depthOrder(rels)
	for i := len(rels) - 1; i >= 0; i-- {
		d := &gozfs.Dataset{Name: snaps[rels[i]].name, Type: gozfs.DatasetSnapshot}
		err := s.destroy(ctx, d, gozfs.DestroyDefault)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("%s: %w", what, err)
		}
	}
	if err := s.gc(ctx); err != nil {
		s.log.Warn("could not destroy unreachable branches", "err", err)
	}
	s.log.Info("snapshot destroyed", "snapshot", name)
	return nil
}

// destroy destroys a dataset through go-zfs, retrying while zfs-fuse
// reports it busy (see retryBusy).
func (s *ZFSStore) destroy(ctx context.Context, d *gozfs.Dataset, flags gozfs.DestroyFlag) error {
	what := "destroy " + d.Name
	if flags&gozfs.DestroyRecursive != 0 {
		what = "destroy -r " + d.Name
	}
	return s.r.retryBusy(ctx, what, func() error {
		return s.r.lib(ctx, what, func() error { return d.Destroy(flags) })
	})
}

// cloneRoots returns the clones made from snapshots of the store (Clone's
// drills), without their children.
func (s *ZFSStore) cloneRoots(inv *zinv) []string {
	var roots []string
	for _, n := range inv.order {
		d := inv.ds[n]
		fs, _, ok := strings.Cut(d.origin, "@")
		if !ok || d.typ != gozfs.DatasetFilesystem {
			continue
		}
		if _, ok := s.rel(inv, fs); !ok {
			continue
		}
		if _, inStore := s.rel(inv, n); inStore {
			continue
		}
		if p, _, _ := cutLast(n, "/"); inv.ds[p] != nil && inv.ds[p].origin != "" {
			continue // a child of a clone
		}
		roots = append(roots, n)
	}
	return roots
}

// savedMountpoint is a file system's mountpoint property and its source.
type savedMountpoint struct{ fs, value, source string }

// hideClones sets mountpoint=none on clones (unmounting them and their
// children) so that renames in the store do not try to remount them.
func (s *ZFSStore) hideClones(ctx context.Context, roots []string) ([]savedMountpoint, error) {
	var saved []savedMountpoint
	for _, fs := range roots {
		out, err := s.r.run(ctx, "get", "-H", "-o", "value,source", "mountpoint", fs)
		if err != nil || len(out) != 1 {
			s.restoreClones(ctx, saved)
			return nil, fmt.Errorf("read mountpoint of clone %s: %w", fs, err)
		}
		v, src, _ := strings.Cut(out[0], "\t")
		if v == "none" {
			continue
		}
		if err := s.r.runRetryBusy(ctx, "set", "mountpoint=none", fs); err != nil {
			s.restoreClones(ctx, saved)
			return nil, fmt.Errorf("unmount clone %s: %w", fs, err)
		}
		saved = append(saved, savedMountpoint{fs, v, src})
	}
	return saved, nil
}

// restoreClones undoes hideClones. Failures are logged: the operation that
// needed the clones out of the way has already succeeded or failed on its
// own account.
func (s *ZFSStore) restoreClones(ctx context.Context, saved []savedMountpoint) {
	for _, m := range saved {
		if err := s.restoreMountpoint(ctx, m); err != nil {
			s.log.Error("could not restore the mountpoint of a clone; set it by hand", "dataset", m.fs, "mountpoint", m.value, "err", err)
		}
	}
}

// restoreMountpoint sets the mountpoint property back: locally, or by
// inheriting again.
func (s *ZFSStore) restoreMountpoint(ctx context.Context, m savedMountpoint) error {
	if m.source == "local" {
		return s.r.runRetryBusy(ctx, "set", "mountpoint="+m.value, m.fs)
	}
	return s.r.runRetryBusy(ctx, "inherit", "mountpoint", m.fs)
}

// unmount unmounts file systems, children first.
func (s *ZFSStore) unmount(ctx context.Context, fss []string) error {
	for i := len(fss) - 1; i >= 0; i-- {
		err := s.r.runRetryBusy(ctx, "umount", fss[i])
		var ce *CommandError
		if errors.As(err, &ce) && strings.Contains(ce.Stderr, "not currently mounted") {
			continue
		}
		if err != nil {
			return fmt.Errorf("unmount %s: %w", fss[i], err)
		}
	}
	return nil
}
