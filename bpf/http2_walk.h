/* HTTP/2 frame walk: the frame headers in the bytes a DATA record does not capture.
 *
 * Why: a DATA record captures at most MAX_CAPTURE_BYTES of a chunk. A process that
 * moves several frames in one call (a 100 KB response written as 16 KiB DATA frames
 * in one write; a client reading 16 KiB at a time) leaves frame headers in the
 * uncaptured part, and user space would lose the framing there (the exchange ends
 * TRUNCATED with a lower-bound body size). The kernel knows where those headers are:
 * it follows the frame lengths, and hands user space the 9 header bytes of every
 * frame whose header is not wholly captured (struct h2_frame_hint after the captured
 * bytes, data_event_hdr.frame_hints of them; include/events.h).
 *
 * Tracking: conn_t.h2_next[dir] (syscall stream) / tls_h2_next[dir] (the OpenSSL
 * plaintext stream tied to the fd) / tls_conn_t.h2_next[dir] (an fd-less OpenSSL
 * stream: Node.js's memory BIOs; openssl.h stores it, h2_tls_track_store) = bytes from
 * the stream's current end to the next frame header; 0 at the start (a client's
 * preface is recognised at position 0 and skipped); H2_PARTIAL when a header's first 1
 * or 2 bytes ended the last chunk; H2_LOST when the walk fell out of step.
 *
 * Every chunk of an HTTP/2 stream goes through the walk: the calling program only
 * stores the chunk in the per-CPU `h2_walk` state and tail-calls the walk program
 * (h2_walk_syscall for the syscall tracepoints, h2_walk_tls for the OpenSSL uprobes: a
 * tail call stays within one program type), so the read/write programs keep their
 * verifier budget. The walk skips a chunk that ends before the next header; otherwise
 * it reads each header with bpf_probe_read_user (9 bytes), checks it (frames.py's
 * plausible_frame, without extension types) and adds 9 + length, H2_WALK_BATCH frames
 * per program run, tail-calling itself up to H2_WALK_CALLS runs; then it emits the DATA
 * record itself (captured bytes + hints) and stores the new tracking. Should the tail
 * call fail, the caller emits the record as before (no hints; the stream is H2_LOST).
 *
 * Out of step (a header that does not validate, more frames than the budget, more than
 * H2_HINTS_MAX hints, a chunk the kernel cannot read: sendfile, vectored calls): the
 * walk stops, what it found so far is handed over (user space treats the rest as a
 * plain gap), the stream is H2_LOST (counted in CNT_H2_WALK_LOST), and the next chunk
 * is walked from its first byte as a guess: writers usually start a call at a frame
 * boundary. A guess may be wrong; hints are the real bytes at their positions, and user
 * space uses a hint only at the position where its own framing expects a header.
 *
 * Not walked: HTTP/2 after an h2c Upgrade (the kernel's protocol stays HTTP/1),
 * vectored calls (syscalls.c handle_iov: a call that fits one record is captured
 * whole; a segment larger than that gets a record of its own, so a header in a segment
 * of its own is captured whole; the stream is marked H2_LOST).
 */
#ifndef OTEL_EBPF_HTTP2_WALK_H
#define OTEL_EBPF_HTTP2_WALK_H

#define H2_LOST 0xffffffffU
/* A frame header began 1 or 2 bytes (bits 16-17) before the stream's current end, its
 * length field's first bytes in bits 8-15 and 0-7: the next chunk completes it. */
#define H2_PARTIAL 0x80000000U
#ifndef H2_WALK_BATCH
#define H2_WALK_BATCH 32 /* frame headers read per walk program run */
#endif
#ifndef H2_WALK_CALLS
#define H2_WALK_CALLS 8 /* walk program runs per chunk (tail calls) */
#endif
#if (H2_HINTS_MAX & (H2_HINTS_MAX - 1)) != 0 || H2_HINTS_MAX < 1 || H2_HINTS_MAX > 1024
#error "H2_HINTS_MAX must be a power of two between 1 and 1024"
#endif

#define H2_PREFACE_8 P8('P', 'R', 'I', ' ', '*', ' ', 'H', 'T')

struct h2_walk_t {
    struct conn_key_t key; /* fd < 0: an fd-less OpenSSL stream (openssl.h) */
    __u64 generation;
    __u64 ssl;      /* the SSL* of an fd-less stream; 0 otherwise */
    __u64 buf;      /* the chunk, in user memory */
    __u64 size;     /* bytes the call moved */
    __u64 position; /* of the chunk's first byte in its stream */
    __u64 off;      /* next frame header, from the chunk's first byte */
    __u32 next;     /* the stream's h2_next before this chunk */
    __u32 partial;  /* H2_PARTIAL value for a header this chunk ends in, else 0 */
    __u32 tid;
    __u32 cap;      /* bytes the record captures: min(size, MAX_CAPTURE_BYTES) */
    __u32 nhints;
    __u8 dir;
    __u8 source;
    __u8 role;
    __u8 calls;     /* walk program runs so far for this chunk */
    __u8 done;      /* the walk reached the chunk's end */
    __u8 lost;      /* the walk fell out of step */
    __u8 _pad[2];
    struct h2_frame_hint hints[H2_HINTS_MAX];
};
BPF_PERCPU_ARRAY(h2_walk, struct h2_walk_t, 1);
BPF_PERCPU_ARRAY(h2_scratch, struct data_event_h2, 1);
BPF_PROG_ARRAY(h2_tail, 1); /* [0] = h2_walk_syscall (loaded by capture/compile.py) */
#ifdef WITH_OPENSSL
BPF_PROG_ARRAY(h2_tls_tail, 1); /* [0] = h2_walk_tls */
#endif

/* Called where a chunk of a PROTO_HTTP2 stream is about to be emitted: store it for
 * the walk program and mark the stream H2_LOST until the walk stores better; the
 * caller then tail-calls the walk (which emits the record) and, should the tail call
 * fail, emits as usual. Stores only, no branch on the chunk: the verifier then walks
 * the caller's emission once (a branch on size here cost tls_exit_* +228k verified
 * insns); every decision is the walk program's. */
static __always_inline void h2_walk_store(struct conn_key_t *key, __u64 generation,
                                          __u8 role, __u32 *track, __u64 ssl, __u32 tid,
                                          __u8 dir, __u8 source, const void *ubuf,
                                          __u64 size, __u64 position)
{
    __u32 zero = 0;
    struct h2_walk_t *w = h2_walk.lookup(&zero);
    if (w) {
        w->key = *key;
        w->generation = generation;
        w->ssl = ssl;
        w->buf = (__u64)ubuf;
        w->size = size;
        w->position = position;
        w->tid = tid;
        w->next = *track;
        w->dir = dir & 1;
        w->source = source;
        w->role = role;
        w->calls = 0;
    }
    *track = H2_LOST;
}

/* The same for a connection's syscall or fd-tied OpenSSL stream. */
static __always_inline void h2_walk_begin(struct conn_key_t *key, struct conn_t *conn,
                                          __u32 tid, __u8 dir, __u8 source,
                                          const void *ubuf, __u64 size, __u64 position)
{
    __u8 d = dir & 1;
    __u32 *track = source == SOURCE_OPENSSL ? &conn->tls_h2_next[d] : &conn->h2_next[d];
    h2_walk_store(key, conn->generation, conn->role, track, 0, tid, d, source, ubuf, size,
                  position);
}

#ifdef WITH_OPENSSL
/* openssl.h: stores the tracking of an fd-less stream (tls_conn_t.h2_next). */
static __always_inline void h2_tls_track_store(__u64 ssl, __u32 tgid, __u64 generation,
                                               __u8 dir, __u32 next);
#endif

/* Could these be a frame header? frames.py plausible_frame, any length up to 2^24-1,
 * the nine frame types of RFC 9113 only. */
static __always_inline int h2_header_ok(__u32 len, __u8 type, __u8 flags, __u32 sid)
{
    if (type > 9)
        return 0;
    /* flags each type may carry, type t in byte t (DATA .. GOAWAY); then 8 and 9 */
    __u64 allowed = P8(0x09, 0x2d, 0, 0, 0x01, 0x0c, 0x01, 0);
    __u8 ok_flags = type < 8 ? (__u8)(allowed >> (type * 8)) : type == 9 ? 0x04 : 0;
    if (flags & ~ok_flags)
        return 0;
    if (type == 4 || type == 6 || type == 7) { /* SETTINGS, PING, GOAWAY: stream 0 */
        if (sid)
            return 0;
        if (type == 4)
            return len % 6 == 0 && !((flags & 1) && len);
        return type == 6 ? len == 8 : len >= 8;
    }
    if (type == 8) /* WINDOW_UPDATE */
        return len == 4;
    if (!sid)
        return 0;
    if (type == 2) /* PRIORITY */
        return len == 5;
    if (type == 3) /* RST_STREAM */
        return len == 4;
    return 1;
}

/* The stream's first bytes, with a client's preface possibly among them. */
static __always_inline int position_is_start(struct h2_walk_t *w)
{
    return w->position == 0 && w->off == 0 && w->size >= 8;
}

/* One frame header at w->off. Returns 1 when the walk is over (done or lost). A
 * header the chunk ends in (split across calls) is handed over with the bytes there,
 * unchecked; with 3 or more its length says where the next one starts, with fewer the
 * next chunk completes the length (H2_PARTIAL). */
static __always_inline int h2_walk_step(struct h2_walk_t *w)
{
    __u64 off = w->off, size = w->size;
    if (off >= size) {
        w->done = 1;
        return 1;
    }
    __u64 n = size - off < 9 ? size - off : 9;
    __u8 h[16] = {};
    if (bpf_probe_read_user(h, n & 15, (void *)(w->buf + off)) != 0) {
        w->lost = 1;
        return 1;
    }
    __u32 len = (__u32)h[0] << 16 | (__u32)h[1] << 8 | h[2];
    __u32 sid = ((__u32)h[5] & 0x7f) << 24 | (__u32)h[6] << 16 | (__u32)h[7] << 8 | h[8];
    if (n == 9 && !h2_header_ok(len, h[3], h[4], sid)) {
        w->lost = 1;
        return 1;
    }
    if (off + n > w->cap) { /* not wholly captured: hand it over */
        __u32 k = w->nhints;
        if (k >= H2_HINTS_MAX) {
            w->lost = 1;
            return 1;
        }
        struct h2_frame_hint *hint = &w->hints[k & (H2_HINTS_MAX - 1)];
        hint->offset = (__u32)off;
        __builtin_memcpy(hint->header, h, 9);
        hint->header_len = n;
        w->nhints = k + 1;
    }
    if (n < 3) {
        w->partial = H2_PARTIAL | (__u32)n << 16 | (__u32)h[0] << 8 | (n == 2 ? h[1] : 0);
        w->done = 1;
        return 1;
    }
    w->off = off + 9 + len;
    if (n < 9)
        w->done = 1;
    return n < 9;
}

/* The chunk starts inside a header whose first k bytes ended the previous chunk:
 * complete its length field from this chunk's first 3 - k bytes. */
static __always_inline void h2_walk_resume_partial(struct h2_walk_t *w, __u32 next)
{
    __u32 k = (next >> 16) & 3;
    __u32 need = 3 - k;
    __u8 b[4] = {};
    if (k < 1 || k > 2 || w->size < need ||
        bpf_probe_read_user(b, need & 3, (void *)w->buf) != 0) {
        w->lost = 1;
        return;
    }
    __u32 len = k == 1 ? ((next >> 8) & 0xff) << 16 | (__u32)b[0] << 8 | b[1]
                       : ((next >> 8) & 0xff) << 16 | (next & 0xff) << 8 | b[0];
    w->off = 9 - k + len;
}

/* The walk is over: store the tracking, emit the DATA record with its hints. */
static __always_inline void h2_walk_finish(void *ctx, struct h2_walk_t *w, int tls)
{
    __u8 d = w->dir & 1;
    struct conn_key_t key = w->key;
    struct conn_t *conn = conns.lookup(&key);
    if (!w->done)
        w->lost = 1; /* the frame budget ran out */
    if (w->lost)
        counter_add(CNT_H2_WALK_LOST, 1);
    __u64 next = w->lost ? H2_LOST : w->partial ? w->partial : w->off - w->size;
    if (next > H2_LOST || (!w->lost && !w->partial && next >= H2_PARTIAL))
        next = H2_LOST;
#ifdef WITH_OPENSSL
    if (tls && w->ssl)
        h2_tls_track_store(w->ssl, key.tgid, w->generation, d, (__u32)next);
    else
#endif
    if (conn && conn->generation == w->generation) {
        if (w->source == SOURCE_OPENSSL)
            conn->tls_h2_next[d] = (__u32)next;
        else
            conn->h2_next[d] = (__u32)next;
    }

    __u32 zero = 0;
    struct data_event_h2 *ev = h2_scratch.lookup(&zero);
    if (!ev)
        return;
    __u64 size = w->size;
    ev->hdr.kind = EVENT_DATA;
    ev->hdr.direction = d;
    ev->hdr.source = w->source;
    ev->hdr.role = w->role;
    ev->hdr.tgid = key.tgid;
    ev->hdr.tid = w->tid;
    ev->hdr.fd = key.fd;
    ev->hdr.generation = w->generation;
    ev->hdr.timestamp_ns = bpf_ktime_get_ns();
    ev->hdr.position = w->position;
    ev->hdr.size = size;
    ev->hdr._pad0 = 0;
    __u32 len = w->cap;
    len &= (MAX_CAPTURE_BYTES << 1) - 1;
    if (len > MAX_CAPTURE_BYTES)
        len = MAX_CAPTURE_BYTES;
    if (len && bpf_probe_read_user(ev->data, len, (void *)w->buf) != 0) {
        counter_add(CNT_READ_FAULT, 1);
        len = 0;
    }
    ev->hdr.captured_len = len;
    __u32 n = w->nhints;
    n &= (H2_HINTS_MAX << 1) - 1;
    if (n > H2_HINTS_MAX)
        n = H2_HINTS_MAX;
    __u32 hint_bytes = n * sizeof(struct h2_frame_hint);
    if (hint_bytes && bpf_probe_read_kernel(ev->data + len, hint_bytes, w->hints) != 0)
        hint_bytes = n = 0;
    ev->hdr.frame_hints = n;
    counter_add(CNT_H2_FRAME_HINTS, n);
    counter_add(CNT_TRUNCATED_EVENTS, len < size);
    counter_add(CNT_TRUNCATED_BYTES, size - len);
    __u64 total = sizeof(struct data_event_hdr) + len + hint_bytes;
    if (total > sizeof(struct data_event_h2))
        return;
    if (events.ringbuf_output(ev, total, rb_flags()) != 0)
        counter_add(CNT_RINGBUF_FULL, 1);
}

/* One walk program run. The first: a chunk that ends before the next frame header
 * is not walked; a client's preface at position 0 is skipped. Then frames. */
static __always_inline void h2_walk_run(void *ctx, int tls)
{
    __u32 zero = 0;
    struct h2_walk_t *w = h2_walk.lookup(&zero);
    if (!w)
        return;
    if (w->calls == 0) {
        __u64 size = w->size, next = w->next;
        w->cap = size < MAX_CAPTURE_BYTES ? (__u32)size : MAX_CAPTURE_BYTES;
        w->nhints = 0;
        w->done = 0;
        w->lost = 0;
        w->partial = 0;
        w->off = next == H2_LOST ? 0 : next; /* lost: guess a frame starts the chunk */
        if (!w->buf || size > 0x7fffffff) {
            w->lost = 1; /* nothing to read (sendfile) */
        } else if (next != H2_LOST && (next & H2_PARTIAL)) {
            h2_walk_resume_partial(w, next);
        } else if (next != H2_LOST && next >= size) {
            w->done = 1; /* inside one frame's payload */
        } else if (position_is_start(w)) {
            __u64 v = 0;
            if (bpf_probe_read_user(&v, 8, (void *)w->buf) == 0 && v == H2_PREFACE_8)
                w->off = 24;
        }
    }
    w->calls++;
    if (!w->done && !w->lost) {
#pragma clang loop unroll(disable)
        for (int i = 0; i < H2_WALK_BATCH; i++) {
            if (h2_walk_step(w))
                break;
        }
    }
    if (!w->done && !w->lost && w->calls < H2_WALK_CALLS) {
#ifdef WITH_OPENSSL
        if (tls)
            h2_tls_tail.call(ctx, 0);
        else
#endif
            h2_tail.call(ctx, 0); /* does not return when it succeeds */
    }
    h2_walk_finish(ctx, w, tls);
}

int h2_walk_syscall(void *ctx)
{
    h2_walk_run(ctx, 0);
    return 0;
}

#ifdef WITH_OPENSSL
int h2_walk_tls(struct pt_regs *ctx)
{
    h2_walk_run(ctx, 1);
    return 0;
}
#endif

#endif /* OTEL_EBPF_HTTP2_WALK_H */
