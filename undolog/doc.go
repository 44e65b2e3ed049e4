// Package undolog is undomail's undo log: an append-only, hash-chained record
// of every user intent (verb) the proxy forwarded, plus a content-addressed
// store for the message blobs those verbs carry.
//
// On disk a log is a directory:
//
//	DIR/undo.db                 SQLite (WAL, synchronous=FULL): records, meta
//	DIR/blobs/ab/<sha256 hex>   message blobs, fanned out by the first two hex digits
//	DIR/blobs/tmp/              blobs being written; leftovers are crash debris
//	DIR/HEAD                    "<seq, 20 digits> <sum hex>\n" of the last committed record
//	DIR/LOCK                    flock held by the one process that has the log open
//
// The log is write-ahead for the proxy: a client is told OK only after
// [Log.Append] returned nil, and Append returns only after the records are
// committed and fsynced. Concurrent appends share one transaction and one
// fsync (group commit), see [Log.Stats].
//
// The database's schema has a version (PRAGMA user_version); Open migrates
// an older log in one transaction and refuses one from a newer undomail,
// untouched (migrate.go).
//
// Every record's sum is the SHA-256 over its content and the previous
// record's sum, so a changed byte, a missing record or a lost tail is
// detectable; [Check] reports all of them for `undomail fsck`, and tells
// corruption apart from a torn tail after a crash (docs/architecture.md,
// "Trust nothing on disk"). Messages up to [DefaultInlineBlobMax] live in
// the database, compressed where that pays (pack.go), larger ones as
// files; either way a blob is named and verified by the SHA-256 of its
// content.
package undolog
