package undolog

import (
	"bytes"
	"compress/flate"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
)

// Codecs of inline_blobs.data (schema version 5). A blob is named by the
// SHA-256 of its content whatever the codec, and every reader decodes
// before it hashes, so a damaged compressed blob fails verification like
// a damaged plain one.
const (
	codecPlain   = 0 // data is the blob
	codecDeflate = 1 // data is the blob compressed with DEFLATE (RFC 1951); size is the blob's length
)

// Mail is mostly text (headers, plain and HTML parts, quoted-printable),
// which DEFLATE shrinks to a third or less; base64 attachments shrink to
// about three quarters, already compressed images and archives not at
// all. An inline blob is stored compressed only where that saves at
// least one sixteenth, so incompressible content costs no decoding.
//
// Level 2: on a typical 4 KiB message (text and a base64 attachment) it
// keeps 61 % of the bytes in about 50 us, where level 6 (the default)
// keeps as much in 70-90 us and level 1 keeps 65 % in 30-45 us
// (go test ./internal/loadtest -run X -bench BenchmarkPack). It runs in
// the session's goroutine, outside the committer.
const packLevel = 2

// deflaters keeps compressors for reuse. Not a sync.Pool: a flate.Writer
// is about 1 MB of state that costs more to make than a 4 KiB message to
// compress, and a pool is emptied by every garbage collection.
var deflaters = make(chan *flate.Writer, 16)

// pack returns content compressed, or nil where compressing does not pay.
func pack(content []byte) []byte {
	if len(content) < 256 {
		return nil
	}
	var buf bytes.Buffer
	buf.Grow(len(content) / 2)
	var w *flate.Writer
	select {
	case w = <-deflaters:
		w.Reset(&buf)
	default:
		w, _ = flate.NewWriter(&buf, packLevel)
	}
	_, err := w.Write(content)
	if err == nil {
		err = w.Close()
	}
	select {
	case deflaters <- w:
	default:
	}
	if err != nil || buf.Len()+buf.Len()/16 >= len(content) {
		return nil
	}
	return buf.Bytes()
}

// unpack returns an inline blob's content from its stored data. size is
// inline_blobs.size: the content's length for a compressed blob, which
// bounds what a damaged one can inflate to.
func unpack(sha string, data []byte, codec int64, size sql.NullInt64) ([]byte, error) {
	switch codec {
	case codecPlain:
		return data, nil
	case codecDeflate:
		if !size.Valid || size.Int64 < 0 || size.Int64 > 1<<30 {
			return nil, fmt.Errorf("inline blob %s: compressed, with no valid size (%v): blob corrupted", sha, size)
		}
		out := make([]byte, 0, size.Int64)
		r := flate.NewReader(bytes.NewReader(data))
		defer r.Close()
		b := bytes.NewBuffer(out)
		if _, err := io.Copy(b, io.LimitReader(r, size.Int64+1)); err != nil {
			return nil, fmt.Errorf("inline blob %s: decompress: %v: blob corrupted", sha, err)
		}
		if int64(b.Len()) != size.Int64 {
			return nil, fmt.Errorf("inline blob %s: decompresses to %d bytes, stored size %d: blob corrupted", sha, b.Len(), size.Int64)
		}
		return b.Bytes(), nil
	}
	return nil, fmt.Errorf("inline blob %s: unknown codec %d", sha, codec)
}

// readInline returns the content of the inline blob sha; ok is false
// (and err nil) when there is no such inline blob.
func readInline(ctx context.Context, q querier, sha string) (content []byte, ok bool, err error) {
	var data []byte
	var codec int64
	var size sql.NullInt64
	err = q.QueryRowContext(ctx, `SELECT data, codec, size FROM inline_blobs WHERE sha = ?`, sha).Scan(&data, &codec, &size)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return nil, false, nil
	case err != nil:
		return nil, false, err
	}
	content, err = unpack(sha, data, codec, size)
	return content, true, err
}
