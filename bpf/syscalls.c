/* otel-ebpf kernel side: HTTP/1.x capture at the socket syscalls (one compilation unit;
 * otel_ebpf/capture/loader.py inlines our own #include files before handing the text to
 * BCC, because BCC rewrites map calls only in the main file).
 *
 * In:  syscall tracepoints (enter + exit) for accept, accept4, connect, close, read,
 *      readv, recvfrom, recvmsg, recvmmsg, write, writev, sendto, sendmsg, sendmmsg,
 *      sendfile64; sock:sock_{send,recv}_length (is this fd a socket? which struct
 *      sock?); sock:inet_sock_set_state and tcp:tcp_rcv_space_adjust (the 4-tuple of a
 *      struct sock, read from tracepoint fields only: we never dereference kernel
 *      structs, whose layout differs between the 6.1 headers and the running kernel).
 * Out: ring buffer `events` of the records in include/events.h: one CONN_OPEN right
 *      before a connection's first data event, DATA per chunk (a vectored call's
 *      segments concatenated, one record per run that fits: handle_iov), CONN_CLOSE at
 *      close(2) for connections that were opened.
 * Dropped and counted (include/events.h CNT_*): ring buffer full, truncated bytes,
 *      table full, iovec segments past 16 + 33 * 32, mmsg messages after the first.
 *      MSG_PEEK reads are not data (the bytes are read again).
 * Gated: connections stay silent until in-kernel inference (protocol_infer.h) says
 *      HTTP; after INFER_MAX_TRIES non-HTTP chunks (INFER_MAX_TRIES_ATTACHED for
 *      sockets older than us) they are ignored for good. Non-TCP and non-socket fds
 *      never create connection entries (when sock_*_length exist). Nothing is traced
 *      until user space sets SELECT_ENABLED (after the pid filter is in place).
 *      With a port filter, connections the kernel can tell are outside it emit
 *      nothing at all (conn_select), counted in CNT_SELECT_DROPPED.
 * Attach-time gaps closed: a syscall already blocked when we attached (recv, accept)
 *      gets its arguments from the saved user registers at its exit (x86_64).
 *
 * Compile-time flags (loader.py): MAX_CAPTURE_BYTES, MAX_CONNS, RINGBUF_PAGES,
 * MAX_IOVECS, MAX_PORT_FILTER, SELF_TGID (the daemon, never traced), HAVE_SOCK_LENGTH,
 * HAVE_TCP_RCV_SPACE_ADJUST, HAVE_INET_SOCK_SET_STATE, OTEL_REGS_FALLBACK, WITH_OPENSSL,
 * HAVE_TASK_STORAGE (the argument stash: include/maps.h).
 */
#include <uapi/linux/ptrace.h>

#include "include/events.h"
#include "include/maps.h"
#include "protocol_infer.h"

#define OTEL_EINPROGRESS 115
#define OTEL_ECONNRESET 104
#define OTEL_EPIPE 32
#define OTEL_IPPROTO_TCP 6
#define OTEL_TCP_ESTABLISHED 1
#define OTEL_MSG_PEEK 2

/* User-space ABI structs (x86_64/arm64 LP64 UAPI; stable, unlike kernel structs). */
struct otel_iovec {
    __u64 base;
    __u64 len;
};
struct otel_msghdr {
    __u64 name;
    __u32 namelen;
    __u32 _pad0;
    __u64 iov;
    __u64 iovlen;
    __u64 control;
    __u64 controllen;
    __u32 flags;
    __u32 _pad1;
};
struct otel_mmsghdr {
    struct otel_msghdr hdr;
    __u32 len;
    __u32 _pad;
};
struct otel_sockaddr_in6 { /* also covers sockaddr_in: family, port, then v4 addr */
    __u16 family;
    __u16 port; /* network order */
    __u32 v4_or_flowinfo;
    __u8 v6[16];
};

/* ---- selection ------------------------------------------------------------------ */

static __always_inline int traced_tgid(__u32 tgid)
{
#ifdef SELF_TGID
    if (tgid == SELF_TGID)
        return 0;
#endif
    __u32 k = CFG_SELECT;
    __u64 *select = config.lookup(&k);
    if (!select || !(*select & SELECT_ENABLED))
        return 0;
    if ((*select & SELECT_PID_IGNORE) && pid_ignored.lookup(&tgid))
        return 0;
    if (*select & SELECT_PID_FILTER)
        return pid_filter.lookup(&tgid) != 0;
    return 1;
}

/* ---- emission: shared with openssl.h ---------------------------------------------- */

/* Ring-buffer output flags: no wake-up while less than WAKEUP_BYTES are queued (user
 * space drains on its poll timeout anyway), a forced one beyond. One epoll wake-up per
 * record costs the consumer more than decoding the record. A forced wake-up costs the
 * traced thread a self-IPI (irq_work; in a VM, a VM exit): ~10-15 % of sys_exit_writev
 * in bpf_cost while the reader lags. It is also what holds the producers back when the
 * reader cannot keep up: forcing one only where the queue crosses a multiple of
 * WAKEUP_BYTES let nginx run 43k -> 61k req/s in test_load_recall, past the daemon's
 * drain rate, and 22 % of the exchanges were lost (ringbuf_full). */
#ifndef WAKEUP_BYTES
#define WAKEUP_BYTES (256 * 1024)
#endif
/* BCC 0.26 rewrites map methods it knows only; bpf_ringbuf_query(&events) would pass a
 * NULL map. Borrow the rewrite of ringbuf_reserve and turn it into the query. */
#define bpf_ringbuf_reserve(map, what, flags) ((void *)bpf_ringbuf_query(map, what))
static __always_inline __u64 rb_flags(void)
{
    __u64 queued = (__u64)events.ringbuf_reserve(BPF_RB_AVAIL_DATA);
    return queued < WAKEUP_BYTES ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
}
#undef bpf_ringbuf_reserve

/* Emit one DATA record: header + up to MAX_CAPTURE_BYTES of buf, through the per-CPU
 * scratch buffer and one bpf_ringbuf_output of exactly header + captured bytes.
 * buf is user memory holding `size` bytes when kcap == 0 (NULL: nothing captured,
 * e.g. sendfile), else kernel memory holding kcap bytes (the fast path's replay of
 * stored heads). Counts truncation and ring buffer loss. Returns captured bytes, or
 * -1 when the record was lost. */
static __always_inline int emit_data_core(__u32 tgid, __u32 tid, __s32 fd,
                                          __u64 generation, __u8 role, __u8 direction,
                                          __u8 source, const void *buf, __u32 kcap,
                                          __u64 size, __u64 position, __u64 ts)
{
    __u32 zero = 0;
    struct data_event *ev = scratch.lookup(&zero);
    if (!ev)
        return -1;
    ev->hdr.kind = EVENT_DATA;
    ev->hdr.direction = direction;
    ev->hdr.source = source;
    ev->hdr.role = role;
    ev->hdr.tgid = tgid;
    ev->hdr.tid = tid;
    ev->hdr.fd = fd;
    ev->hdr.generation = generation;
    ev->hdr.timestamp_ns = ts;
    ev->hdr.position = position;
    ev->hdr.size = size;
    ev->hdr._pad0 = 0;

    __u32 len = 0;
    if (buf) {
        /* Re-read the size from map memory: the verifier then tracks `len` from this
         * load only and does not mark the caller's loop variables precise, which would
         * stop state pruning and blow its budget on the iovec loop. */
        __u64 sz = *(volatile __u64 *)&ev->hdr.size;
        if (kcap && kcap < sz)
            sz = kcap;
        len = sz < MAX_CAPTURE_BYTES ? (__u32)sz : MAX_CAPTURE_BYTES;
        /* keep the verifier's bound even if clang reorders the min() above */
        len &= (MAX_CAPTURE_BYTES << 1) - 1;
        if (len > MAX_CAPTURE_BYTES)
            len = MAX_CAPTURE_BYTES;
        long err = 0;
        if (len)
            err = kcap ? bpf_probe_read_kernel(ev->data, len, buf)
                       : bpf_probe_read_user(ev->data, len, buf);
        if (err != 0) {
            counter_add(CNT_READ_FAULT, 1);
            len = 0;
        }
    }
    ev->hdr.captured_len = len;
    /* branch-free on purpose: fewer verifier paths per iovec loop iteration */
    counter_add(CNT_TRUNCATED_EVENTS, len < size);
    counter_add(CNT_TRUNCATED_BYTES, size - len);
    __u64 total = sizeof(struct data_event_hdr) + len;
    if (total > sizeof(struct data_event))
        return -1;
    if (events.ringbuf_output(ev, total, rb_flags()) != 0) {
        counter_add(CNT_RINGBUF_FULL, 1);
        return -1;
    }
    return len;
}

/* A chunk as it moves: user buffer, timestamp now. Shared with openssl.h, which passes
 * source = SOURCE_OPENSSL and conn->tls_pos[dir]. */
static __always_inline int emit_data(void *ctx, __u32 tgid, __u32 tid, __s32 fd,
                                     __u64 generation, __u8 role, __u8 direction,
                                     __u8 source, const void *ubuf, __u64 size,
                                     __u64 position)
{
    return emit_data_core(tgid, tid, fd, generation, role, direction, source, ubuf, 0,
                          size, position, bpf_ktime_get_ns());
}

/* A chunk replayed later from kernel memory (kcap > 0 bytes at kbuf), with the
 * timestamp it really had. */
static __always_inline int emit_data_at(__u32 tgid, __u32 tid, __s32 fd, __u64 generation,
                                        __u8 role, __u8 direction, __u8 source,
                                        const void *kbuf, __u32 kcap, __u64 size,
                                        __u64 position, __u64 ts)
{
    return emit_data_core(tgid, tid, fd, generation, role, direction, source,
                          kcap ? kbuf : 0, kcap, size, position, ts);
}

/* The best addresses known for a connection: the struct sock's 4-tuple when a
 * tracepoint gave it to us, else what accept/connect saw (remote only). The 4-tuple,
 * once found, is copied into the connection (CONN_ADDRS_SK): conn->sk never changes
 * for an entry (a different sk replaces the entry) and neither does the tuple of a
 * struct sock, so later records skip the sk_addrs lookup. */
static __always_inline void conn_addrs(struct conn_t *conn, __u16 *family, __u16 *lport,
                                       __u16 *rport, __u8 *laddr, __u8 *raddr)
{
    if (!(conn->flags & CONN_ADDRS_SK) && conn->sk) {
        __u64 sk = conn->sk;
        struct sk_addr_t *a = sk_addrs.lookup(&sk);
        if (a && a->family) {
            conn->family = a->family;
            conn->local_port = a->local_port;
            conn->remote_port = a->remote_port;
            __builtin_memcpy(conn->local_addr, a->local_addr, 16);
            __builtin_memcpy(conn->remote_addr, a->remote_addr, 16);
            conn->flags |= CONN_ADDRS_SK;
        }
    }
    *family = conn->family;
    *lport = conn->local_port;
    *rport = conn->remote_port;
    __builtin_memcpy(laddr, conn->local_addr, 16);
    __builtin_memcpy(raddr, conn->remote_addr, 16);
}

/* Emit the connection's CONN_OPEN once, with the best addresses known now and where
 * its emitted streams begin (stream_start, by DIR_*: 0 unless the fast path served the
 * connection first). Shared with openssl.h. */
static __always_inline void conn_ensure_open_at(struct conn_key_t *key, struct conn_t *conn,
                                                __u32 tid, __u8 source, __u64 start_in,
                                                __u64 start_out)
{
    if (conn->flags & CONN_OPEN_SENT)
        return;
    conn->flags |= CONN_OPEN_SENT; /* once, even if the ring buffer was full */
    struct conn_open_event ev = {};
    ev.kind = EVENT_CONN_OPEN;
    ev.role = conn->role;
    ev.source = source;
    ev.tgid = key->tgid;
    ev.tid = tid;
    ev.fd = key->fd;
    ev.generation = conn->generation;
    ev.timestamp_ns = conn->open_ts;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    conn_addrs(conn, &ev.family, &ev.local_port, &ev.remote_port, ev.local_addr,
               ev.remote_addr);
    ev.stream_start[DIR_INGRESS] = start_in;
    ev.stream_start[DIR_EGRESS] = start_out;
    /* each source's stream has its own inference: ciphertext vs plaintext */
    ev.protocol = source == SOURCE_OPENSSL ? conn->tls_proto : conn->proto;
    if (events.ringbuf_output(&ev, sizeof(ev), rb_flags()) != 0)
        counter_add(CNT_RINGBUF_FULL, 1);
}

static __always_inline void conn_ensure_open(void *ctx, struct conn_key_t *key,
                                             struct conn_t *conn, __u32 tid, __u8 source)
{
    conn_ensure_open_at(key, conn, tid, source, 0, 0);
}

/* Look up (tgid, fd); NULL when untracked. Shared with openssl.h. */
static __always_inline struct conn_t *conn_lookup(__u32 tgid, __s32 fd)
{
    struct conn_key_t key = {.tgid = tgid, .fd = fd};
    return conns.lookup(&key);
}

/* Create (or replace: a reused fd is a new connection) the entry for (tgid, fd).
 * NULL when the table is full (counted). Shared with openssl.h. */
static __always_inline struct conn_t *conn_create(__u32 tgid, __s32 fd, __u8 role)
{
    struct conn_key_t key = {.tgid = tgid, .fd = fd};
    struct conn_t c = {};
    __u64 now = bpf_ktime_get_ns();
    c.generation = now;
    c.open_ts = now;
    c.role = role;
    /* Sockets older than us may be mid-message: only accept/connect start at a
     * boundary, so only they may take the fast path. */
    if (role != ROLE_UNKNOWN) {
        __u32 k = CFG_FAST_PATH;
        __u64 *fast = config.lookup(&k);
        if (fast && *fast)
            c.fast = FAST_IDLE;
    }
    if (conns.update(&key, &c) != 0) {
        counter_add(CNT_CONN_TABLE_FULL, 1);
        return 0;
    }
    return conns.lookup(&key);
}

/* Lookup, else create with ROLE_UNKNOWN: what the TLS uprobes use for an fd. */
static __always_inline struct conn_t *conn_get_or_create(__u32 tgid, __s32 fd)
{
    struct conn_t *c = conn_lookup(tgid, fd);
    if (c)
        return c;
    return conn_create(tgid, fd, ROLE_UNKNOWN);
}

#ifdef HAVE_SOCK_LENGTH
/* Selection by port (SELECT_PORT_FILTER), decided in sock_*_length (note_sock), cached
 * in conn->flags: the read/write exits (whose verifier budget the fast path's parser
 * spends) pay one bit test per chunk. Ports come from this struct sock's 4-tuple
 * (both) when known, else from accept/connect (remote only). One selected port keeps
 * the connection; dropping needs both ports known, so while one is unknown the next
 * syscall asks again, and user space filters what went out meanwhile as before. A
 * connection user space has already heard of (a socket older than us: its entry is
 * made at its first data exit, after this ran) may still be dropped: user space
 * drops it too, and its CONN_CLOSE still comes. Not in the middle of a fast-path
 * exchange, whose pending entry would be left behind: at a later syscall. */
static __always_inline void conn_select(__u32 tgid, __s32 fd, __u64 sk)
{
    struct conn_key_t key = {.tgid = tgid, .fd = fd};
    struct conn_t *conn = conns.lookup(&key);
    if (!conn || (conn->flags & CONN_SELECT_DONE) || (conn->sk && conn->sk != sk))
        return; /* a different sk: a reused fd, replaced at its data exit */
    __u8 flags = conn->flags | CONN_SELECT_DONE;
    __u16 lport = 0, rport = conn->remote_port;
    struct sk_addr_t *a = sk_addrs.lookup(&sk);
    if (a && a->family) {
        lport = a->local_port;
        rport = a->remote_port;
    }
    if ((!lport || !port_filter.lookup(&lport)) && (!rport || !port_filter.lookup(&rport))) {
        if (!lport || !rport || conn->fast > FAST_IDLE) {
            if (conn->proto == PROTO_NOT_HTTP)
                conn->flags = flags; /* emits nothing anyway: stop asking */
            return;
        }
        flags |= CONN_IGNORED;
        conn->fast = FAST_OFF;
        counter_add(CNT_SELECT_DROPPED, 1);
    }
    conn->flags = flags;
}
#endif

/* ---- the kernel fast path ------------------------------------------------------------ */
#include "http1_fast.h"

/* Emit CONN_CLOSE (when the open was emitted) and forget the entry. An exchange the
 * fast path had in flight is replayed first, so user space sees the close mid-exchange
 * as it would have on the chunk stream. */
static __always_inline void conn_close(struct conn_key_t *key, struct conn_t *c, __u32 tid)
{
    if (c->fast == FAST_REQ || c->fast == FAST_RESP)
        fast_fallback(key, c, tid, c->fast_src, CNT_FB_CLOSED);
    if (c->flags & CONN_OPEN_SENT) {
        struct conn_close_event ev = {};
        ev.kind = EVENT_CONN_CLOSE;
        ev.source = SOURCE_SYSCALL;
        ev.tgid = key->tgid;
        ev.tid = tid;
        ev.fd = key->fd;
        ev.generation = c->generation;
        ev.timestamp_ns = bpf_ktime_get_ns();
        ev.bytes_sent = c->pos[DIR_EGRESS];
        ev.bytes_received = c->pos[DIR_INGRESS];
        ev.reset = (c->flags & CONN_RESET) != 0;
        if (events.ringbuf_output(&ev, sizeof(ev), rb_flags()) != 0)
            counter_add(CNT_RINGBUF_FULL, 1);
    }
    conns.delete(key);
}

/* ---- HTTP/2: frame headers in uncaptured bytes (h2_walk_begin, h2_tail) -------------- */
#include "http2_walk.h"

/* ---- TLS hook ----------------------------------------------------------------------- */
#ifdef WITH_OPENSSL
/* openssl.h must define:
 *   static __always_inline int tls_syscall_hook(__u64 pid_tgid, __s32 fd);
 * called at every data syscall exit on a tracked connection before anything is
 * emitted; returns 1 when the bytes are ciphertext inside an SSL call (then the
 * syscall bytes only advance positions and are never emitted). */
#include "openssl.h"
#else
static __always_inline int tls_syscall_hook(__u64 pid_tgid, __s32 fd)
{
    return 0;
}
#endif

/* ---- the data path ------------------------------------------------------------------ */

/* Is this chunk HTTP (1.x or 2)? Updates the connection's inference state; INFER_PREFIX
 * chunks (too short to know) are emitted so byte-at-a-time writers are not lost. A
 * stream's first bytes (head[], up to 8 gathered over tiny writes) may say HTTP/1.x or
 * HTTP/2; a later chunk only HTTP/1.x (a socket older than us, caught mid-stream).
 * HTTP/2 takes the connection off the HTTP/1 fast path for good: a DATA frame's payload
 * may well start like a request line. The fast path has consumed nothing of it (its
 * first bytes did not look like HTTP/1.x to it either), so the streams start at 0. */
static __always_inline int infer_chunk(struct conn_t *conn, __u8 dir, const void *ubuf,
                                       __u64 size)
{
    __u64 v = 0;
    __u32 n = size < 8 ? (__u32)size : 8;
    if (bpf_probe_read_user(&v, n & 15, ubuf) != 0)
        return INFER_NO;
    int r = INFER_NO;
    __u8 d = dir & 1;
    __u8 hl = conn->head_len[d];
    if (hl < 8) {
        __u32 room = 8 - hl;
        __u32 take = n < room ? n : room;
        conn->head[d] |= (v & byte_mask(take)) << ((hl & 7) * 8);
        hl += take;
        conn->head_len[d] = hl;
        r = infer_proto(conn->head[d], hl, server_bytes(d, conn->role));
        if (r == INFER_NO)
            conn->head_len[d] = 0xff;
        /* through map memory: the verifier then forgets which of the inference's many
         * exits r came from and walks the rest once (-130k insns on sys_exit_write) */
        conn->infer = r;
        r = *(volatile __u8 *)&conn->infer;
    }
    if (r == INFER_NO && infer_http(v, n) == INFER_MATCH)
        r = INFER_MATCH;
    if (r >= INFER_MATCH) {
        conn->proto = infer_protocol_id(r);
        if (r == INFER_HTTP2 && conn->fast == FAST_IDLE)
            conn->fast = FAST_OFF;
    } else if (r == INFER_NO) {
        __u8 limit = conn->role == ROLE_UNKNOWN ? INFER_MAX_TRIES_ATTACHED : INFER_MAX_TRIES;
        if (++conn->fails >= limit) {
            conn->proto = PROTO_NOT_HTTP;
            counter_add(CNT_NOT_HTTP, 1);
        }
    }
    return r;
}

static __always_inline void handle_chunk(void *ctx, struct conn_key_t *key,
                                         struct conn_t *conn, __u32 tid, __u8 dir,
                                         const void *ubuf, __u64 size)
{
    __u8 d = dir & 1;
    __u64 pos = conn->pos[d];
    conn->pos[d] = pos + size; /* every moved byte counts, emitted or not */
    if (conn->proto == PROTO_NOT_HTTP)
        return;
    if (conn->proto == PROTO_UNKNOWN) {
        if (!ubuf || infer_chunk(conn, d, ubuf, size) == INFER_NO)
            return;
    }
    conn_ensure_open(ctx, key, conn, tid, SOURCE_SYSCALL);
    /* (no buffer: sendfile, an unreadable msghdr; the walk would have nothing to read,
     * and its tracking only costs missing hints when stale: see http2_walk.h) */
    if (ubuf && conn->proto == PROTO_HTTP2) {
        h2_walk_begin(key, conn, tid, d, SOURCE_SYSCALL, ubuf, size, pos);
        h2_tail.call(ctx, 0); /* walks the frames and emits; returns only on failure */
    }
    emit_data(ctx, key->tgid, tid, key->fd, conn->generation, conn->role, d,
              SOURCE_SYSCALL, ubuf, size, pos);
}

/* Vectored calls: the segments actually moved (bounded by the return value) go out in
 * runs, one DATA record per run: consecutive segments are concatenated while the run
 * fits in IOV_RUN_BYTES, so a call that fits (nginx's HTTP/2 frames: a 9-byte header
 * and its payload in separate buffers, one writev per frame or several) is one record,
 * the same bytes a write() of the concatenation would give. A segment that does not
 * fit starts a new run; one larger than the run capacity is captured as before, its
 * first MAX_CAPTURE_BYTES, in a run of its own. So every byte captured per segment
 * before still is (Node.js's chunk-size lines stay visible, an HTTP/2 frame header in
 * its own segment before a large payload too), at the same position, with fewer
 * records; a segment the kernel cannot read ends its run uncaptured, as it was.
 * The walk state lives in a per-CPU map: the syscall's program walks MAX_IOVECS
 * segments, then tail-calls `iov_continue` (IOV_BATCH segments per call, up to the
 * kernel's 33 tail calls: 16 + 33 * 32 >= IOV_MAX 1024); the run being built carries
 * over. Whatever is left after that goes out as one uncaptured chunk: positions stay
 * exact, the skip is counted. Inference looks at the first segment only: running it
 * inside the loop multiplies the verifier's paths per iteration past its
 * 1M-instruction budget. */
#ifndef IOV_BATCH
#define IOV_BATCH 32
#endif
/* Bytes one run gathers. A segment is copied at an offset below it with a length up to
 * it, so the buffer is twice that (the verifier bounds offset and length separately),
 * and a per-CPU map value must stay under 32 KiB: 8 KiB at most. */
#if MAX_CAPTURE_BYTES > 8192
#define IOV_RUN_BYTES 8192
#else
#define IOV_RUN_BYTES MAX_CAPTURE_BYTES
#endif

struct iov_state_t {
    struct conn_key_t key;
    __u64 iov;
    __u64 iovcnt;
    __u64 left;
    __u64 next;     /* index of the next segment to read */
    __u64 run_pos;  /* stream position of the run's first byte */
    __u64 run_size; /* bytes the run's segments moved; 0: no run */
    __u32 run_cap;  /* of them captured (the first run_cap); < run_size: run closed */
    __u32 tid;
    __u8 dir;
    __u8 emit;
    __u8 _pad[6];
};
BPF_PERCPU_ARRAY(iov_state, struct iov_state_t, 1);
BPF_PROG_ARRAY(iov_tail, 1);

/* The run's DATA record as it is built (only header + captured bytes go out). */
struct iov_run_t {
    struct data_event_hdr hdr;
    __u8 data[2 * IOV_RUN_BYTES];
};
BPF_PERCPU_ARRAY(iov_run, struct iov_run_t, 1);

/* Emit the run gathered so far as one DATA record. */
static __always_inline void iov_flush(void *ctx, struct iov_state_t *s, struct conn_t *conn)
{
    __u64 size = s->run_size;
    if (size == 0)
        return;
    s->run_size = 0;
    __u32 zero = 0;
    struct iov_run_t *r = iov_run.lookup(&zero);
    if (!r)
        return;
    r->hdr.kind = EVENT_DATA;
    r->hdr.direction = s->dir & 1;
    r->hdr.source = SOURCE_SYSCALL;
    r->hdr.role = conn->role;
    r->hdr.tgid = s->key.tgid;
    r->hdr.tid = s->tid;
    r->hdr.fd = s->key.fd;
    r->hdr.generation = conn->generation;
    r->hdr.timestamp_ns = bpf_ktime_get_ns();
    r->hdr.position = s->run_pos;
    r->hdr.size = size;
    r->hdr.frame_hints = 0;
    r->hdr._pad0 = 0;
    /* from map memory, as in emit_data_core: keeps the loop variables imprecise */
    __u32 len = *(volatile __u32 *)&s->run_cap;
    len &= (MAX_CAPTURE_BYTES << 1) - 1;
    if (len > MAX_CAPTURE_BYTES)
        len = MAX_CAPTURE_BYTES;
    r->hdr.captured_len = len;
    counter_add(CNT_TRUNCATED_EVENTS, len < size);
    counter_add(CNT_TRUNCATED_BYTES, size - len);
    __u64 total = sizeof(struct data_event_hdr) + len;
    if (total > sizeof(struct iov_run_t))
        return;
    if (events.ringbuf_output(r, total, rb_flags()) != 0)
        counter_add(CNT_RINGBUF_FULL, 1);
}

/* Add n bytes at user address base (stream position pos) to the run: a new run when
 * the current one is closed or has no room for all n. */
static __always_inline void iov_append(void *ctx, struct iov_state_t *s, struct conn_t *conn,
                                       __u64 base, __u64 n, __u64 pos)
{
    __u64 off = s->run_size;
    if (off && (s->run_cap < off || off + n > IOV_RUN_BYTES)) {
        iov_flush(ctx, s, conn);
        off = 0;
    }
    __u32 zero = 0;
    struct iov_run_t *r = iov_run.lookup(&zero);
    if (!r)
        return;
    long err;
    __u32 len;
    if (off == 0) {
        s->run_pos = pos;
        len = n < MAX_CAPTURE_BYTES ? (__u32)n : MAX_CAPTURE_BYTES;
        len &= (MAX_CAPTURE_BYTES << 1) - 1;
        if (len > MAX_CAPTURE_BYTES)
            len = MAX_CAPTURE_BYTES;
        err = bpf_probe_read_user(r->data, len, (void *)base);
    } else { /* off + n <= IOV_RUN_BYTES, so off < IOV_RUN_BYTES and n <= IOV_RUN_BYTES */
        len = (__u32)n & ((IOV_RUN_BYTES << 1) - 1);
        if (len > IOV_RUN_BYTES)
            len = IOV_RUN_BYTES;
        err = bpf_probe_read_user(r->data + (off & (IOV_RUN_BYTES - 1)), len, (void *)base);
    }
    if (err != 0) {
        counter_add(CNT_READ_FAULT, 1);
        len = 0; /* the run ends here, these bytes uncaptured */
    }
    s->run_size = off + n;
    s->run_cap = (__u32)off + len;
}

static __always_inline void iov_segment(void *ctx, struct iov_state_t *s,
                                        struct conn_t *conn)
{
    __u64 i = s->next;
    struct otel_iovec seg = {};
    if (bpf_probe_read_user(&seg, sizeof(seg), (void *)(s->iov + i * sizeof(seg))) != 0) {
        s->iovcnt = 0; /* unreadable array: the rest is reported uncaptured */
        return;
    }
    s->next = i + 1;
    __u64 n = seg.len < s->left ? seg.len : s->left;
    if (n == 0)
        return;
    __u8 d = s->dir & 1;
    __u64 pos = conn->pos[d];
    conn->pos[d] = pos + n;
    s->left -= n;
    if (s->emit)
        iov_append(ctx, s, conn, seg.base, n, pos);
}

/* Continue in iov_continue while segments remain; when the tail call is impossible
 * (chain limit, program not installed), finish with one uncaptured chunk. The run
 * goes out first: records leave in stream order. */
static __always_inline void iov_finish(void *ctx, struct iov_state_t *s, struct conn_t *conn)
{
    if (s->left && s->next < s->iovcnt)
        iov_tail.call(ctx, 0); /* does not return when it succeeds */
    iov_flush(ctx, s, conn);
    if (s->left) {
        counter_add(CNT_IOVEC_SKIPPED, 1);
        __u8 d = s->dir & 1;
        __u64 pos = conn->pos[d];
        __u64 left = s->left;
        conn->pos[d] = pos + left;
        s->left = 0;
        if (s->emit)
            emit_data(ctx, s->key.tgid, s->tid, s->key.fd, conn->generation, conn->role, d,
                      SOURCE_SYSCALL, 0, left, pos);
    }
}

int iov_continue(void *ctx)
{
    __u32 zero = 0;
    struct iov_state_t *s = iov_state.lookup(&zero);
    if (!s)
        return 0;
    struct conn_key_t key = s->key;
    struct conn_t *conn = conns.lookup(&key);
    if (!conn)
        return 0;
#pragma clang loop unroll(disable)
    for (int j = 0; j < IOV_BATCH; j++) {
        if (s->left == 0 || s->next >= s->iovcnt)
            break;
        iov_segment(ctx, s, conn);
    }
    iov_finish(ctx, s, conn);
    return 0;
}

static __always_inline void handle_iov(void *ctx, struct conn_key_t *key,
                                       struct conn_t *conn, __u32 tid, __u8 dir,
                                       __u64 iov, __u64 iovcnt, __u64 total)
{
    __u8 d = dir & 1;
    int emit = conn->proto == PROTO_HTTP1 || conn->proto == PROTO_HTTP2; /* PROTOCOL_LIST */
    if (conn->proto == PROTO_UNKNOWN && iovcnt > 0) {
        struct otel_iovec first = {};
        if (bpf_probe_read_user(&first, sizeof(first), (void *)iov) == 0 && first.len) {
            __u64 n = first.len < total ? first.len : total;
            emit = infer_chunk(conn, d, (const void *)first.base, n) != INFER_NO;
        }
    }
    if (emit)
        conn_ensure_open(ctx, key, conn, tid, SOURCE_SYSCALL);
    /* HTTP/2 frames are not walked across segments (http2_walk.h); unconditional:
     * a branch here doubles the verifier's walk of the segment loop */
    conn->h2_next[d] = H2_LOST;
    __u32 zero = 0;
    struct iov_state_t *s = iov_state.lookup(&zero);
    if (!s)
        return;
    s->key = *key;
    s->iov = iov;
    s->iovcnt = iovcnt;
    s->left = total;
    s->next = 0;
    s->run_size = 0;
    s->run_cap = 0;
    s->tid = tid;
    s->dir = d;
    s->emit = emit;
#pragma clang loop unroll(disable)
    for (int j = 0; j < MAX_IOVECS; j++) {
        if (s->left == 0 || s->next >= s->iovcnt)
            break;
        iov_segment(ctx, s, conn);
    }
    iov_finish(ctx, s, conn);
}

/* A syscall whose entry we never saw (it began before we attached: a server blocked
 * in recv() or accept() at start-up) still has its arguments in the saved user
 * registers. x86_64 only: the offsets are the ptrace ABI's struct pt_regs (stable for
 * decades), not a kernel-internal struct; bpf_task_pt_regs needs kernel >= 5.15.
 * flags_arg: which argument holds MSG_* flags (3 or 4; 0 = none). */
#ifdef OTEL_REGS_FALLBACK
#define PT_REGS_FROM_R10 56 /* r10, r9, r8, ax, cx, dx, si, di: 8 words from here */
#endif
static __always_inline int recover_args(__u64 id, __u8 op, int flags_arg, struct stash_t *st)
{
    if (!traced_tgid(id >> 32))
        return 0;
#ifdef OTEL_REGS_FALLBACK
    struct task_struct *task = bpf_get_current_task_btf();
    long regs = bpf_task_pt_regs(task);
    __u64 r[8] = {};
    if (!regs || bpf_probe_read_kernel(r, sizeof(r), (void *)(regs + PT_REGS_FROM_R10)) != 0)
        return 0;
    st->fd = (__s32)r[7];   /* di: argument 1 */
    st->buf = r[6];         /* si: argument 2 */
    st->count = r[5];       /* dx: argument 3 */
    __u64 flags = flags_arg == 3 ? r[5] : flags_arg == 4 ? r[0] : 0; /* r10: argument 4 */
    st->peek = (flags & OTEL_MSG_PEEK) != 0;
    if (op == OP_SENDFILE)
        st->buf = 0; /* argument 2 is the input fd, not a buffer */
    st->op = op;
    return 1;
#else
    return 0;
#endif
}

/* Common exit: consume the stashed arguments, find or lazily create the connection
 * (sockets opened before we attached get ROLE_UNKNOWN), dispatch on the call shape.
 * `op` is a compile-time constant per program, so each program keeps only its path. */
static __always_inline int data_exit(void *ctx, long ret, __u8 op, __u8 dir, int flags_arg)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct stash_t st = {};
    struct stash_t *sp = stash_get(id);
    if (sp) {
        st = *sp;
        stash_drop(id, sp);
    }
    if (!sp || st.op == OP_NONE) {
        if (ret <= 0 || !recover_args(id, op, flags_arg, &st))
            return 0;
    }
    if (st.op != op || st.peek)
        return 0; /* peeked bytes are counted when they are really read */
    __u32 tgid = id >> 32, tid = (__u32)id;
    struct conn_key_t key = {.tgid = tgid, .fd = st.fd};
    struct conn_t *conn = conns.lookup(&key);
    if (ret <= 0) {
        if (conn && (ret == -OTEL_ECONNRESET || ret == -OTEL_EPIPE)) {
            conn->flags |= CONN_RESET; /* its CONN_CLOSE says reset */
            counter_add(CNT_CONN_RESET, 1);
        }
        return 0;
    }
#ifdef HAVE_SOCK_LENGTH
    /* An fd closed without close(2) (close_range, dup2 over it, exec) and reused: the
     * entry is stale. Every socket read/write passes sock_{recv,send}msg (sendfile
     * did not before 6.5, so it proves nothing). */
    if (conn && op != OP_SENDFILE && (!st.sk || (conn->sk && conn->sk != st.sk))) {
        conn_close(&key, conn, tid);
        conn = 0;
    }
#endif
    if (st.sk_family && st.sk_family != OTEL_AF_INET && st.sk_family != OTEL_AF_INET6)
        return 0; /* AF_UNIX & co: never HTTP we report */
    if (st.sk_protocol && st.sk_protocol != OTEL_IPPROTO_TCP)
        return 0; /* UDP (connected DNS sockets) */
    if (!conn) {
#ifdef HAVE_SOCK_LENGTH
        if (!st.sk)
            return 0; /* not a socket: files, pipes, ttys never reach the ring */
#endif
        conn = conn_create(tgid, st.fd, ROLE_UNKNOWN);
        if (!conn)
            return 0;
    }
    if (!conn->sk && st.sk)
        conn->sk = st.sk;
    if (conn->flags & CONN_IGNORED) { /* deselected by port (conn_select) */
        /* still tie the fd of an SSL call: its plaintext must meet this (ignored)
         * connection, not go out on a synthetic fd-less stream */
        tls_syscall_hook(id, st.fd);
        return 0;
    }
    if (tls_syscall_hook(id, st.fd)) {
        conn->pos[dir & 1] += ret; /* ciphertext: OpenSSL uprobes report the plaintext */
        return 0;
    }
    /* the iovec array of vectored calls (msg_ok == 0: unreadable msghdr) */
    __u64 iov = st.buf, iovcnt = st.count;
    int msg_ok = 1;
    if (op == OP_RECVMSG || op == OP_SENDMSG) {
        struct otel_msghdr m = {};
        msg_ok = bpf_probe_read_user(&m, sizeof(m), (void *)st.buf) == 0;
        iov = m.iov;
        iovcnt = m.iovlen;
    }
    if (conn->fast != FAST_OFF && conn->proto != PROTO_NOT_HTTP) {
        int fp = FP_TODAY;
        if (op == OP_READ || op == OP_WRITE) {
            fp = fast_chunk(&key, conn, tid, dir, SOURCE_SYSCALL, (const void *)st.buf, ret,
                            ret);
        } else if (op == OP_SENDFILE) {
            fp = fast_chunk(&key, conn, tid, dir, SOURCE_SYSCALL, 0, 0, ret);
        } else if (op == OP_RECVMMSG || op == OP_SENDMMSG) {
            /* ret counts messages, not bytes: nothing to count a body against */
            if (conn->fast == FAST_IDLE || conn->fast_src == SOURCE_SYSCALL)
                fast_fallback(&key, conn, tid, SOURCE_SYSCALL, CNT_FB_OTHER);
        } else {
            /* The whole call is one chunk of ret bytes; a head must lie in the first
             * non-empty segment. No parsing inside the iovec walk: the verifier walks
             * that loop per segment and its budget is spent there. */
            struct otel_iovec seg = {};
            if (msg_ok) {
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    if (k >= iovcnt || bpf_probe_read_user(&seg, sizeof(seg),
                                                           (void *)(iov + k * sizeof(seg))) != 0) {
                        seg.len = 0;
                        break;
                    }
                    if (seg.len)
                        break;
                }
            }
            __u64 cap = seg.len < (__u64)ret ? seg.len : (__u64)ret;
            fp = fast_chunk(&key, conn, tid, dir, SOURCE_SYSCALL,
                            cap ? (const void *)seg.base : 0, cap, ret);
        }
        if (fp == FP_DONE)
            return 0;
    }
    if (op == OP_READ || op == OP_WRITE) {
        handle_chunk(ctx, &key, conn, tid, dir, (const void *)st.buf, ret);
    } else if (op == OP_SENDFILE) {
        handle_chunk(ctx, &key, conn, tid, dir, 0, ret);
    } else if (op == OP_READV || op == OP_WRITEV) {
        handle_iov(ctx, &key, conn, tid, dir, iov, iovcnt, ret);
    } else if (op == OP_RECVMSG || op == OP_SENDMSG) {
        if (msg_ok)
            handle_iov(ctx, &key, conn, tid, dir, iov, iovcnt, ret);
        else
            handle_chunk(ctx, &key, conn, tid, dir, 0, ret);
    } else if (op == OP_RECVMMSG || op == OP_SENDMMSG) {
        /* ret is a message count: walk the first message only (HTTP over TCP with
         * *mmsg is rare); later messages are counted, and their bytes are unknown
         * here, so positions after them have a gap user space sees as loss. */
        struct otel_mmsghdr m = {};
        if (bpf_probe_read_user(&m, sizeof(m), (void *)st.buf) == 0 && m.len)
            handle_iov(ctx, &key, conn, tid, dir, m.hdr.iov, m.hdr.iovlen, m.len);
        if (ret > 1)
            counter_add(CNT_MMSG_SKIPPED, ret - 1);
    }
    return 0;
}

static __always_inline int stash_args_flags(__u8 op, __s32 fd, __u64 buf, __u64 count_,
                                            __u64 flags)
{
    __u64 id = bpf_get_current_pid_tgid();
    if (!traced_tgid(id >> 32) || fd < 0)
        return 0;
    struct stash_t st = {};
    st.op = op;
    st.fd = fd;
    st.buf = buf;
    st.count = count_;
    st.peek = (flags & OTEL_MSG_PEEK) != 0;
    if (stash_put(id, &st) != 0)
        counter_add(CNT_STASH_FULL, 1);
    return 0;
}

static __always_inline int stash_args(__u8 op, __s32 fd, __u64 buf, __u64 count_)
{
    return stash_args_flags(op, fd, buf, count_, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return stash_args(OP_READ, args->fd, (__u64)args->buf, args->count); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return data_exit(args, args->ret, OP_READ, DIR_INGRESS, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return stash_args_flags(OP_READ, args->fd, (__u64)args->ubuf, args->size, args->flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return data_exit(args, args->ret, OP_READ, DIR_INGRESS, 4); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return stash_args(OP_READV, args->fd, (__u64)args->vec, args->vlen); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return data_exit(args, args->ret, OP_READV, DIR_INGRESS, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return stash_args_flags(OP_RECVMSG, args->fd, (__u64)args->msg, 0, args->flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return data_exit(args, args->ret, OP_RECVMSG, DIR_INGRESS, 3); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmmsg) { return stash_args_flags(OP_RECVMMSG, args->fd, (__u64)args->mmsg, args->vlen, args->flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg) { return data_exit(args, args->ret, OP_RECVMMSG, DIR_INGRESS, 4); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return stash_args(OP_WRITE, args->fd, (__u64)args->buf, args->count); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return data_exit(args, args->ret, OP_WRITE, DIR_EGRESS, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return stash_args(OP_WRITE, args->fd, (__u64)args->buff, args->len); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return data_exit(args, args->ret, OP_WRITE, DIR_EGRESS, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return stash_args(OP_WRITEV, args->fd, (__u64)args->vec, args->vlen); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return data_exit(args, args->ret, OP_WRITEV, DIR_EGRESS, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return stash_args(OP_SENDMSG, args->fd, (__u64)args->msg, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return data_exit(args, args->ret, OP_SENDMSG, DIR_EGRESS, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg) { return stash_args(OP_SENDMMSG, args->fd, (__u64)args->mmsg, args->vlen); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg) { return data_exit(args, args->ret, OP_SENDMMSG, DIR_EGRESS, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { return stash_args(OP_SENDFILE, args->out_fd, 0, args->count); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) { return data_exit(args, args->ret, OP_SENDFILE, DIR_EGRESS, 0); }

/* ---- connection lifecycle ------------------------------------------------------------ */

/* Read a user sockaddr; returns its family (0 on fault). */
static __always_inline __u16 read_sockaddr(__u64 uaddr, __u16 *port, __u8 addr[16])
{
    struct otel_sockaddr_in6 sa = {};
    if (!uaddr || bpf_probe_read_user(&sa, sizeof(sa), (void *)uaddr) != 0)
        return 0;
    if (sa.family == OTEL_AF_INET) {
        *port = __builtin_bswap16(sa.port);
        __builtin_memcpy(addr, &sa.v4_or_flowinfo, 4);
    } else if (sa.family == OTEL_AF_INET6) {
        *port = __builtin_bswap16(sa.port);
        __builtin_memcpy(addr, sa.v6, 16);
    }
    return sa.family;
}

static __always_inline int accept_enter(__s32 fd, __u64 uaddr)
{
    return stash_args(OP_ACCEPT, fd, uaddr, 0);
}

static __always_inline int accept_exit(long ret)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct stash_t st = {};
    struct stash_t *sp = stash_get(id);
    if (sp) {
        st = *sp;
        stash_drop(id, sp);
    }
    if (!sp || st.op == OP_NONE) { /* blocked in accept() since before we attached */
        if (ret < 0 || !recover_args(id, OP_ACCEPT, 0, &st))
            return 0;
    }
    __u64 uaddr = st.buf;
    if (st.op != OP_ACCEPT || ret < 0)
        return 0;
    __u16 port = 0;
    __u8 addr[16] = {};
    /* upeer_sockaddr may be NULL: family stays unknown, sock_*_length tells later */
    __u16 family = read_sockaddr(uaddr, &port, addr);
    if (family && family != OTEL_AF_INET && family != OTEL_AF_INET6)
        return 0;
    struct conn_t *c = conn_create(id >> 32, (__s32)ret, ROLE_SERVER);
    if (c && family) {
        c->family = family;
        c->remote_port = port;
        __builtin_memcpy(c->remote_addr, addr, 16);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return accept_enter(args->fd, (__u64)args->upeer_sockaddr); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return accept_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return accept_enter(args->fd, (__u64)args->upeer_sockaddr); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return accept_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    __u16 family = 0;
    if (bpf_probe_read_user(&family, sizeof(family), (void *)args->uservaddr) != 0)
        return 0;
    if (family != OTEL_AF_INET && family != OTEL_AF_INET6)
        return 0; /* AF_UNIX, AF_NETLINK...: not ours */
    return stash_args(OP_CONNECT, args->fd, (__u64)args->uservaddr, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct stash_t *sp = stash_get(id);
    if (!sp)
        return 0;
    struct stash_t st = *sp;
    stash_drop(id, sp);
    if (st.op != OP_CONNECT)
        return 0;
    /* non-blocking connect returns EINPROGRESS and the fd is the connection */
    if (args->ret != 0 && args->ret != -OTEL_EINPROGRESS)
        return 0;
    struct conn_t *c = conn_create(id >> 32, st.fd, ROLE_CLIENT);
    if (!c)
        return 0;
    __u16 port = 0;
    __u8 addr[16] = {};
    __u16 family = read_sockaddr(st.buf, &port, addr);
    c->family = family;
    c->remote_port = port;
    __builtin_memcpy(c->remote_addr, addr, 16);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct conn_key_t key = {.tgid = id >> 32, .fd = (__s32)args->fd};
    struct conn_t *c = conns.lookup(&key);
    if (c)
        conn_close(&key, c, (__u32)id);
    return 0;
}

/* ---- socket identity and addresses --------------------------------------------------- */

#ifdef HAVE_SOCK_LENGTH
/* Fires inside sock_sendmsg/sock_recvmsg, in the syscall's context: proves the fd of
 * the in-flight syscall is a socket and tells us its struct sock and protocol. */
static __always_inline void note_sock(__u64 sk, __u16 family, __u16 protocol)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct stash_t *sp = stash_get(id);
    if (!sp) {
        /* entered before we attached: keep what we learn for the exit (OP_NONE) */
        if (!traced_tgid(id >> 32))
            return;
        struct stash_t st = {};
        st.op = OP_NONE;
        st.fd = -1;
        st.sk = sk;
        st.sk_family = family;
        st.sk_protocol = protocol;
        stash_put(id, &st);
        return;
    }
    if (sp->sk)
        return;
    sp->sk = sk;
    sp->sk_family = family;
    sp->sk_protocol = protocol;
    __u32 k = CFG_SELECT;
    __u64 *select = config.lookup(&k);
    if (select && (*select & SELECT_PORT_FILTER))
        conn_select(id >> 32, sp->fd, sk);
}
TRACEPOINT_PROBE(sock, sock_send_length) { note_sock((__u64)args->sk, args->family, args->protocol); return 0; }
TRACEPOINT_PROBE(sock, sock_recv_length) { note_sock((__u64)args->sk, args->family, args->protocol); return 0; }
#endif

#define STORE_TUPLE(a, args)                                                          \
    do {                                                                              \
        (a).family = (args)->family;                                                  \
        (a).local_port = (args)->sport;                                               \
        (a).remote_port = (args)->dport;                                              \
        if ((args)->family == OTEL_AF_INET) {                                         \
            __builtin_memcpy((a).local_addr, (args)->saddr, 4);                       \
            __builtin_memcpy((a).remote_addr, (args)->daddr, 4);                      \
        } else {                                                                      \
            __builtin_memcpy((a).local_addr, (args)->saddr_v6, 16);                   \
            __builtin_memcpy((a).remote_addr, (args)->daddr_v6, 16);                  \
        }                                                                             \
    } while (0)

#ifdef HAVE_INET_SOCK_SET_STATE
/* Handshake completion (softirq context, keyed by the struct sock pointer only). */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != OTEL_IPPROTO_TCP || args->newstate != OTEL_TCP_ESTABLISHED)
        return 0;
    if (args->family != OTEL_AF_INET && args->family != OTEL_AF_INET6)
        return 0;
    struct sk_addr_t a = {};
    STORE_TUPLE(a, args);
    __u64 sk = (__u64)args->skaddr;
    sk_addrs.update(&sk, &a);
    return 0;
}
#endif

#ifdef HAVE_TCP_RCV_SPACE_ADJUST
/* Per CPU, struct socks whose tuple sk_addrs holds, direct-mapped by pointer: this
 * tracepoint runs in every TCP receive of the machine (twice per exchange in
 * bpf_cost, ours and the client's), and a slot compare costs no hash lookup. Every
 * SK_SEEN_RECHECK-th hit looks sk_addrs up anyway: the lookup keeps a busy socket's
 * entry recent for the LRU, and refills it if it was evicted. */
#define SK_SEEN_SLOTS 256
#define SK_SEEN_RECHECK 64
struct sk_seen_t {
    __u64 sk;
    __u64 hits;
};
BPF_PERCPU_ARRAY(sk_seen, struct sk_seen_t, SK_SEEN_SLOTS);

/* Inside tcp_recvmsg: gives the tuple of sockets established before we attached. */
TRACEPOINT_PROBE(tcp, tcp_rcv_space_adjust)
{
    if (args->family != OTEL_AF_INET && args->family != OTEL_AF_INET6)
        return 0;
    __u64 sk = (__u64)args->skaddr;
    __u32 slot = ((sk * 0x9e3779b97f4a7c15ULL) >> 56) & (SK_SEEN_SLOTS - 1);
    struct sk_seen_t *seen = sk_seen.lookup(&slot);
    if (seen) {
        if (seen->sk == sk && (++seen->hits % SK_SEEN_RECHECK))
            return 0;
        seen->sk = sk;
        seen->hits = 0;
    }
    if (sk_addrs.lookup(&sk))
        return 0;
    struct sk_addr_t a = {};
    STORE_TUPLE(a, args);
    sk_addrs.update(&sk, &a);
    return 0;
}
#endif

/* ---- process lifecycle: discovery judges programs, not pids (SELECT_PID_IGNORE) ---- */

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    __u64 ts = bpf_ktime_get_ns();
    pid_ignored.delete(&tgid); /* a new program: traced until user space judges it */
    select_execs.update(&tgid, &ts);
#ifdef WITH_OPENSSL
    tls_execs.update(&tgid, &ts);
#endif
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    if ((__u32)id == tgid) /* the group leader: the pid may be reused from now on */
        pid_ignored.delete(&tgid);
    return 0;
}
