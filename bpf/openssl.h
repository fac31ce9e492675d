/* OpenSSL uprobes: HTTPS plaintext at SSL_read/SSL_write, fed into the syscall pipeline.
 *
 * Included by bpf/syscalls.c under -DWITH_OPENSSL, after its emission helpers
 * (emit_data, conn_ensure_open, conn_lookup, conn_get_or_create, traced_tgid, count)
 * and the fast path (http1_fast.h: fd-tied streams of sockets from accept/connect get
 * one EVENT_EXCHANGE per exchange, source SOURCE_OPENSSL) and before its data path, which calls tls_syscall_hook() at every data syscall exit
 * on a socket. user space (otel_ebpf/capture/tls.py) attaches these programs to every
 * libssl.so.* and every executable exporting the symbols, once per inode:
 *   SSL_read     tls_enter_read     / tls_exit_read       bytes = ret when ret > 0
 *   SSL_read_ex  tls_enter_read_ex  / tls_exit_read_ex    bytes = *readbytes when ret == 1
 *   SSL_write    tls_enter_write    / tls_exit_write      bytes = ret when ret > 0
 *   SSL_write_ex tls_enter_write_ex / tls_exit_write_ex   bytes = *written when ret == 1
 *   SSL_set_fd   tls_enter_set_fd   (ties the SSL* to its socket before the handshake)
 *   SSL_free     tls_enter_free     (forgets the SSL*; closes an fd-less stream)
 * plus the sched:sched_process_exec tracepoint, which tells user space about new
 * programs (tls_execs) so they are examined for OpenSSL right after their exec.
 * Entry stashes (SSL*, buf, out-pointer) per thread; return reads the plaintext that
 * really moved (failed and WANT_READ/WANT_WRITE calls move nothing) and emits one DATA
 * record with source SOURCE_OPENSSL through emit_data(): same ring buffer, same loss
 * and truncation counters as the syscall path.
 *
 * Stream identity. The TLS connection (the SSL*) is the stream. Its socket fd is known
 * when (a) a read/write syscall on a socket happened on this thread during the SSL
 * call (tls_syscall_hook records it), (b) SSL_set_fd named it, or (c) an earlier call
 * on the same SSL* tied it. Then events carry the socket's own key (tgid, fd,
 * generation), role and addresses (conn_ensure_open), with plaintext positions in
 * conn_t.tls_pos[] (the syscall positions count ciphertext). Otherwise (memory BIOs,
 * as Node.js uses: its socket I/O happens in libuv, outside any SSL call) the key is
 * synthetic: fd = -1 - (ssl & 0x7fffffff) (always negative, never a real fd),
 * generation = the time the SSL* was first seen (so an address reused after SSL_free
 * is a new stream even if the SSL_free was missed), ROLE_UNKNOWN and no addresses
 * (family 0): nothing is invented; user space fills what it can.
 *
 * Ciphertext. tls_syscall_hook returns 1 for a syscall made inside an SSL call, so the
 * syscall path only advances its positions and never emits those bytes. Ciphertext
 * outside SSL calls (handshakes, close_notify, all of Node's socket I/O) is rejected by
 * the syscall path's protocol inference (TLS records never start like HTTP).
 *
 * Plaintext is gated by the same inference (protocol_infer.h) per SSL*: HTTP/1.x and
 * HTTP/2 (ALPN h2: the preface, or a server's first SETTINGS) reach the ring buffer;
 * SMTP, database protocols over TLS never do. The stream's PROTO_* goes out in its
 * CONN_OPEN (conn_t.tls_proto for fd-tied streams). An HTTP/2 stream never takes the
 * HTTP/1 fast path.
 */
#ifndef OTEL_EBPF_OPENSSL_H
#define OTEL_EBPF_OPENSSL_H

#ifndef MAX_TLS_CONNS
#define MAX_TLS_CONNS 16384 /* live SSL* tracked; LRU: the oldest idle one is forgotten */
#endif

/* Arguments of an in-flight SSL call, per thread (pid_tgid). */
struct tls_args_t {
    __u64 ssl;      /* SSL * */
    __u64 buf;      /* plaintext buffer */
    __u64 done_ptr; /* size_t *readbytes / *written of the _ex calls; 0 otherwise */
    __s32 fd;       /* socket read/written inside this call (tls_syscall_hook); -1 none */
    __u32 _pad;
};

/* An SSL* is a heap address: only unique within one process (forked nginx workers
 * share addresses), hence the tgid in the key. */
struct tls_key_t {
    __u64 ssl;
    __u32 tgid;
    __u32 _pad;
};

struct tls_conn_t {
    __u64 generation; /* synthetic stream id: ktime when this SSL* was first seen */
    __u64 pos[2];  /* plaintext positions of a synthetic (fd-less) stream, by DIR_* */
    __u64 head[2]; /* first plaintext bytes of each direction (LE), gathered over tiny
                    * SSL_writes for the inference, as conn_t.head for the syscalls */
    __s32 fd;      /* socket tied to this SSL*, -1 none yet */
    __u8 proto;    /* PROTO_* of the plaintext */
    __u8 fails;    /* non-HTTP plaintext chunks while PROTO_UNKNOWN */
    __u8 open_sent; /* synthetic stream: CONN_OPEN emitted, so SSL_free emits CONN_CLOSE */
    __u8 infer;    /* scratch: tls_gate's inference result (see there) */
    __u8 head_len[2]; /* bytes in head[dir]; 0xff: head no longer useful */
    __u32 h2_next[2]; /* synthetic HTTP/2 stream: next frame header (http2_walk.h) */
    __u8 _pad[6];
};

/* LRU: an entry whose return probe never ran (thread killed inside SSL_read) must not
 * stay forever, or that thread's later plaintext syscalls would be swallowed as TLS. */
BPF_TABLE("lru_hash", __u64, struct tls_args_t, tls_args, 16384);
BPF_TABLE("lru_hash", struct tls_key_t, struct tls_conn_t, tls_conns, MAX_TLS_CONNS);

/* Called by syscalls.c at each data syscall exit on a socket, before anything is
 * emitted. Inside an SSL call on this thread: tie the fd and swallow the ciphertext. */
static __always_inline int tls_syscall_hook(__u64 pid_tgid, __s32 fd)
{
    struct tls_args_t *a = tls_args.lookup(&pid_tgid);
    if (!a)
        return 0;
    a->fd = fd;
    return 1;
}

static __always_inline int tls_enter(struct pt_regs *ctx, __u64 done_ptr)
{
    __u64 id = bpf_get_current_pid_tgid();
    if (!traced_tgid(id >> 32))
        return 0;
    struct tls_args_t a = {};
    a.ssl = PT_REGS_PARM1(ctx);
    a.buf = PT_REGS_PARM2(ctx);
    a.done_ptr = done_ptr;
    a.fd = -1;
    if (tls_args.update(&id, &a) != 0)
        counter_add(CNT_STASH_FULL, 1);
    return 0;
}

int tls_enter_read(struct pt_regs *ctx) { return tls_enter(ctx, 0); }
int tls_enter_write(struct pt_regs *ctx) { return tls_enter(ctx, 0); }
int tls_enter_read_ex(struct pt_regs *ctx) { return tls_enter(ctx, PT_REGS_PARM4(ctx)); }
int tls_enter_write_ex(struct pt_regs *ctx) { return tls_enter(ctx, PT_REGS_PARM4(ctx)); }

/* Is this plaintext chunk worth emitting? Per-SSL* inference, like infer_chunk's:
 * a direction's first 8 bytes are gathered in head[] across chunks, so a request
 * written one byte per SSL_write ("G", "E", "T", " ") is PREFIX, PREFIX, PREFIX, then
 * HTTP, not four failures that give the stream up; once the head is full (or says
 * no), each chunk is judged on its own first bytes (an SSL* older than us, caught
 * mid-stream). `settings`: these bytes may be a server's (server_bytes()), so its
 * first SETTINGS counts as HTTP/2; with memory BIOs (ROLE_UNKNOWN) either direction
 * may be. */
static __always_inline int tls_gate(struct tls_conn_t *t, __u8 dir, const void *buf,
                                    __u64 size, int settings)
{
    if (t->proto == PROTO_HTTP1 || t->proto == PROTO_HTTP2) /* PROTOCOL_LIST */
        return 1;
    if (t->proto == PROTO_NOT_HTTP)
        return 0;
    __u64 v = 0;
    __u32 n = size < 8 ? (__u32)size : 8;
    if (bpf_probe_read_user(&v, n & 15, buf) != 0)
        return 0;
    __u8 d = dir & 1;
    __u8 hl = t->head_len[d];
    if (hl < 8) {
        __u32 room = 8 - hl;
        __u32 take = n < room ? n : room;
        t->head[d] |= (v & byte_mask(take)) << ((hl & 7) * 8);
        hl += take;
        t->head_len[d] = hl;
        v = t->head[d];
        n = hl;
    }
    int r = infer_proto(v, n, settings);
    /* through map memory: the verifier forgets which of the inference's exits r came
     * from and walks what follows once */
    t->infer = r;
    r = *(volatile __u8 *)&t->infer;
    if (r == INFER_NO && t->head_len[d] < 8)
        t->head_len[d] = 0xff; /* the head says no: judge later chunks on their own */
    if (r >= INFER_MATCH) {
        t->proto = infer_protocol_id(r);
        return 1;
    }
    if (r == INFER_PREFIX)
        return 1; /* too short to say: let user space decide */
    if (++t->fails >= INFER_MAX_TRIES) {
        t->proto = PROTO_NOT_HTTP;
        counter_add(CNT_NOT_HTTP, 1);
    }
    return 0;
}

static __always_inline int tls_exit(struct pt_regs *ctx, __u8 dir, int ex)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct tls_args_t *ap = tls_args.lookup(&id);
    if (!ap)
        return 0;
    struct tls_args_t a = *ap;
    tls_args.delete(&id);

    int ret = (int)PT_REGS_RC(ctx);
    __u64 size = 0;
    if (ex) {
        if (ret != 1 || !a.done_ptr)
            return 0;
        if (bpf_probe_read_user(&size, sizeof(size), (void *)a.done_ptr) != 0) {
            counter_add(CNT_READ_FAULT, 1);
            return 0;
        }
    } else {
        if (ret <= 0)
            return 0;
        size = (__u64)ret;
    }
    if (size == 0)
        return 0;

    __u32 tgid = id >> 32, tid = (__u32)id;
    __u8 d = dir & 1;
    struct tls_key_t k = {.ssl = a.ssl, .tgid = tgid};
    struct tls_conn_t *t = tls_conns.lookup(&k);
    if (!t) {
        struct tls_conn_t fresh = {};
        fresh.fd = -1;
        fresh.generation = bpf_ktime_get_ns();
        tls_conns.update(&k, &fresh);
        t = tls_conns.lookup(&k);
        if (!t)
            return 0;
    }
    if (a.fd >= 0)
        t->fd = a.fd;

    if (t->fd >= 0) {
        struct conn_key_t ck = {.tgid = tgid, .fd = t->fd};
        struct conn_t *c = conn_get_or_create(tgid, t->fd);
        if (c) {
            if (c->flags & CONN_IGNORED)
                return 0; /* deselected by port (conn_select, at its syscalls) */
            /* The fast path serves the plaintext of sockets it may serve; once it hands
             * over, the stream is HTTP and the gate below must not re-infer it. */
            int fp = fast_chunk(&ck, c, tid, d, SOURCE_OPENSSL, (const void *)a.buf, size,
                                size);
            if (fp == FP_DONE)
                return 0;
            if (fp == FP_FELL)
                t->proto = PROTO_HTTP1;
            __u64 pos = c->tls_pos[d];
            c->tls_pos[d] = pos + size; /* every plaintext byte counts, emitted or not */
            if (!tls_gate(t, d, (const void *)a.buf, size, server_bytes(d, c->role)))
                return 0;
            /* HTTP/2: off the HTTP/1 fast path (it consumed nothing: see infer_chunk) */
            if (t->proto == PROTO_HTTP2 && c->fast == FAST_IDLE)
                c->fast = FAST_OFF;
            c->tls_proto = t->proto;
            conn_ensure_open(ctx, &ck, c, tid, SOURCE_OPENSSL);
            if (t->proto == PROTO_HTTP2) {
                h2_walk_begin(&ck, c, tid, d, SOURCE_OPENSSL, (const void *)a.buf, size, pos);
                h2_tls_tail.call(ctx, 0); /* http2_walk.h: walks and emits */
            }
            emit_data(ctx, tgid, tid, t->fd, c->generation, c->role, d, SOURCE_OPENSSL,
                      (const void *)a.buf, size, pos);
            return 0;
        }
        /* connection table full (counted): report on the synthetic key instead */
    }

    __s32 sfd = -1 - (__s32)(a.ssl & 0x7fffffff);
    __u64 pos = t->pos[d];
    t->pos[d] = pos + size;
    if (!tls_gate(t, d, (const void *)a.buf, size, 1)) /* ROLE_UNKNOWN: either way */
        return 0;
    if (!t->open_sent) {
        t->open_sent = 1;
        struct conn_open_event ev = {};
        ev.kind = EVENT_CONN_OPEN;
        ev.role = ROLE_UNKNOWN;
        ev.source = SOURCE_OPENSSL;
        ev.protocol = t->proto;
        ev.tgid = tgid;
        ev.tid = tid;
        ev.fd = sfd;
        ev.generation = t->generation;
        ev.timestamp_ns = bpf_ktime_get_ns();
        bpf_get_current_comm(&ev.comm, sizeof(ev.comm)); /* names a process gone by lookup */
        if (events.ringbuf_output(&ev, sizeof(ev), rb_flags()) != 0)
            counter_add(CNT_RINGBUF_FULL, 1);
    }
    if (t->proto == PROTO_HTTP2) { /* http2_walk.h: walks the frames and emits */
        struct conn_key_t sk = {.tgid = tgid, .fd = sfd};
        h2_walk_store(&sk, t->generation, ROLE_UNKNOWN, &t->h2_next[d], a.ssl, tid, d,
                      SOURCE_OPENSSL, (const void *)a.buf, size, pos);
        h2_tls_tail.call(ctx, 0);
    }
    emit_data(ctx, tgid, tid, sfd, t->generation, ROLE_UNKNOWN, d, SOURCE_OPENSSL,
              (const void *)a.buf, size, pos);
    return 0;
}

/* http2_walk.h's walk is over on an fd-less stream: where its next frame header is. */
static __always_inline void h2_tls_track_store(__u64 ssl, __u32 tgid, __u64 generation,
                                               __u8 dir, __u32 next)
{
    struct tls_key_t k = {.ssl = ssl, .tgid = tgid};
    struct tls_conn_t *t = tls_conns.lookup(&k);
    if (t && t->generation == generation)
        t->h2_next[dir & 1] = next;
}

int tls_exit_read(struct pt_regs *ctx) { return tls_exit(ctx, DIR_INGRESS, 0); }
int tls_exit_read_ex(struct pt_regs *ctx) { return tls_exit(ctx, DIR_INGRESS, 1); }
int tls_exit_write(struct pt_regs *ctx) { return tls_exit(ctx, DIR_EGRESS, 0); }
int tls_exit_write_ex(struct pt_regs *ctx) { return tls_exit(ctx, DIR_EGRESS, 1); }

/* SSL_set_fd(ssl, fd): a (possibly reused) SSL* starts a new stream on this socket. */
int tls_enter_set_fd(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    if (!traced_tgid(id >> 32))
        return 0;
    struct tls_key_t k = {.ssl = PT_REGS_PARM1(ctx), .tgid = id >> 32};
    struct tls_conn_t t = {};
    t.fd = (__s32)PT_REGS_PARM2(ctx);
    t.generation = bpf_ktime_get_ns();
    tls_conns.update(&k, &t);
    return 0;
}

/* SSL_free(ssl): forget it, so a reused address starts a fresh stream; an fd-less
 * stream has no close(2) of its own, so its CONN_CLOSE is emitted here. */
int tls_enter_free(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct tls_key_t k = {.ssl = PT_REGS_PARM1(ctx), .tgid = id >> 32};
    struct tls_conn_t *t = tls_conns.lookup(&k);
    if (!t)
        return 0;
    if (t->open_sent) {
        struct conn_close_event ev = {};
        ev.kind = EVENT_CONN_CLOSE;
        ev.source = SOURCE_OPENSSL;
        ev.tgid = k.tgid;
        ev.tid = (__u32)id;
        ev.fd = -1 - (__s32)(k.ssl & 0x7fffffff);
        ev.generation = t->generation;
        ev.timestamp_ns = bpf_ktime_get_ns();
        ev.bytes_sent = t->pos[DIR_EGRESS];
        ev.bytes_received = t->pos[DIR_INGRESS];
        if (events.ringbuf_output(&ev, sizeof(ev), rb_flags()) != 0)
            counter_add(CNT_RINGBUF_FULL, 1);
    }
    tls_conns.delete(&k);
    return 0;
}

/* Processes that exec'd since user space last looked (tgid -> ktime), filled by the
 * sched_process_exec probe in syscalls.c. TlsAttacher.tick() drains this every poll loop
 * and examines those processes at once, so a program with OpenSSL linked in (node) is
 * probed within ~100 ms of its exec rather than at the next /proc rescan. Bounded
 * (LRU): a burst of execs loses the oldest, which the rescan still finds. */
BPF_TABLE("lru_hash", __u32, __u64, tls_execs, 1024);

#endif /* OTEL_EBPF_OPENSSL_H */
