/* Maps shared by the syscall programs (syscalls.c) and the OpenSSL uprobes (openssl.h).
 * Kernel-private structs live here; what user space decodes lives in events.h.
 * Sizes are -D knobs set by otel_ebpf/capture/loader.py. */
#ifndef OTEL_EBPF_MAPS_H
#define OTEL_EBPF_MAPS_H

#include "events.h"

#ifndef MAX_CONNS
#define MAX_CONNS 65536 /* tracked (tgid, fd) connections; overflow counted */
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024 /* 4 MiB with 4 KiB pages; power of two */
#endif
#ifndef MAX_IOVECS
#define MAX_IOVECS 16 /* iovec segments walked per vectored call */
#endif
#ifndef INFER_MAX_TRIES
#define INFER_MAX_TRIES 4 /* non-HTTP chunks before a connection is given up */
#endif
#ifndef INFER_MAX_TRIES_ATTACHED
/* For sockets older than us (ROLE_UNKNOWN) we may start in the middle of a large
 * body: allow more chunks before giving up (each costs an 8-byte read, no ring). */
#define INFER_MAX_TRIES_ATTACHED 64
#endif

/* conn_t.flags */
#define CONN_OPEN_SENT 1 /* the open event was emitted: close must be emitted too */
#define CONN_SELECT_DONE 2 /* the port selection's verdict is made (conn_select) */
#define CONN_IGNORED 4 /* deselected by port in the kernel: nothing of it is emitted */
#define CONN_RESET 8   /* a read/write returned ECONNRESET/EPIPE: its CONN_CLOSE says reset */
#define CONN_ADDRS_SK 16 /* family, ports and addresses below are the struct sock's 4-tuple */

/* conn_t.fast: the kernel fast path (http1_fast.h). Only connections created by
 * accept/connect while config[CFG_FAST_PATH] is set start FAST_IDLE; the rest, and
 * every connection the fast path gave up on, are FAST_OFF (the chunk stream). */
#define FAST_OFF 0  /* chunk stream */
#define FAST_IDLE 1 /* between exchanges: at a message boundary in both directions */
#define FAST_REQ 2  /* request head seen; fast_left request body bytes to come */
#define FAST_RESP 3 /* response head seen; fast_left response body bytes to come */

struct conn_key_t {
    __u32 tgid;
    __s32 fd;
};

struct conn_t {
    __u64 generation;   /* ktime at creation: a reused fd gets a new one */
    __u64 open_ts;
    __u64 pos[2];       /* syscall stream positions, indexed by DIR_* */
    __u64 tls_pos[2];   /* plaintext positions for SOURCE_OPENSSL events (openssl.h) */
    __u64 sk;           /* struct sock * learned from sock:sock_{send,recv}_length */
    __u64 head[2];      /* first bytes of each direction (LE), for inference on tiny writes */
    __u8 head_len[2];   /* bytes in head[dir]; 0xff: head no longer useful */
    __u8 role;          /* ROLE_* */
    __u8 proto;         /* PROTO_* (events.h) of the syscall stream */
    __u8 fails;         /* chunks that did not look like HTTP while PROTO_UNKNOWN */
    __u8 flags;         /* CONN_* */
    __u16 family;       /* 0 unknown */
    __u16 local_port;
    __u16 remote_port;
    __u8 tls_proto;     /* PROTO_* of the OpenSSL plaintext stream tied to this fd */
    __u8 infer;         /* scratch: infer_chunk's last result (see there) */
    __u8 fast;          /* FAST_* */
    __u8 fast_src;      /* SOURCE_* that drives the fast state (set at a request head) */
    __u8 local_addr[16];
    __u8 remote_addr[16];
    __u64 fast_left;    /* FAST_REQ/FAST_RESP: body bytes still to come */
    __u64 fast_ts;      /* FAST_RESP: when the last response bytes moved */
    /* PROTO_HTTP2 streams (http2_walk.h): bytes from the stream's current end to the
     * next frame header, by DIR_*, or H2_LOST; 0 at the start (frames from byte 0, the
     * client preface is recognised and skipped). For the syscall and OpenSSL streams. */
    __u32 h2_next[2];
    __u32 tls_h2_next[2];
};

/* Arguments stashed at sys_enter_*, per thread, consumed at sys_exit_* (stash_get). */
#define OP_NONE 0    /* only socket info seen (syscall entered before we attached) */
#define OP_READ 1    /* buf, count */
#define OP_WRITE 2
#define OP_READV 3   /* iov, iovcnt */
#define OP_WRITEV 4
#define OP_RECVMSG 5 /* msghdr */
#define OP_SENDMSG 6
#define OP_RECVMMSG 7 /* mmsghdr */
#define OP_SENDMMSG 8
#define OP_SENDFILE 9
#define OP_ACCEPT 10 /* sockaddr */
#define OP_CONNECT 11
#define OP_EMPTY 0xff /* a consumed entry (HAVE_TASK_STORAGE) */

struct stash_t {
    __u64 buf;      /* user buffer / iovec array / msghdr / mmsghdr / sockaddr */
    __u64 count;    /* byte count or iovec count */
    __u64 sk;       /* set by sock:sock_{send,recv}_length during the syscall */
    __s32 fd;
    __u8 op;        /* OP_* */
    __u8 peek;      /* MSG_PEEK: the bytes stay queued and will be read again */
    __u16 sk_family; /* family/protocol from sock_*_length; 0 when not seen */
    __u16 sk_protocol;
    __u16 _pad1[3];
};

/* The 4-tuple of a socket, keyed by its struct sock * (only as an opaque number:
 * we never dereference kernel structs, their layout differs between kernels). Filled
 * by sock:inet_sock_set_state (handshake, softirq) and tcp:tcp_rcv_space_adjust
 * (inside tcp_recvmsg, so also for sockets older than us). */
struct sk_addr_t {
    __u16 family;
    __u16 local_port;
    __u16 remote_port;
    __u16 _pad;
    __u8 local_addr[16];
    __u8 remote_addr[16];
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(conns, struct conn_key_t, struct conn_t, MAX_CONNS);
/* The stash of the calling thread: stash_put at sys_enter_*, stash_get + stash_drop
 * at the exit (the id is bpf_get_current_pid_tgid()'s). With HAVE_TASK_STORAGE (kernel
 * >= 5.11 with BTF; loader.py) it is task local storage: found through the thread's
 * own storage, no hash and no LRU lock (sys_enter_recvfrom/writev cost nginx ~120 ns
 * less per call, measured by tests/benchmark/bpf_cost.py), and freed with the thread.
 * Such an entry is never deleted: consumed, its op is OP_EMPTY. */
#ifdef HAVE_TASK_STORAGE
BPF_TASK_STORAGE(active, struct stash_t);
static __always_inline struct stash_t *stash_get(__u64 id)
{
    struct stash_t *sp = active.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    return sp && sp->op != OP_EMPTY ? sp : 0;
}
static __always_inline int stash_put(__u64 id, struct stash_t *st)
{
    struct stash_t *sp = active.task_storage_get(bpf_get_current_task_btf(), 0,
                                                 1 /* BPF_LOCAL_STORAGE_GET_F_CREATE */);
    if (!sp)
        return -1;
    *sp = *st;
    return 0;
}
static __always_inline void stash_drop(__u64 id, struct stash_t *sp)
{
    sp->op = OP_EMPTY;
}
#else
/* LRU: a thread killed inside a syscall never reaches its exit; its entry ages out
 * instead of leaking. 64k concurrent blocked syscalls before any eviction. */
BPF_TABLE("lru_hash", __u64, struct stash_t, active, 65536);
static __always_inline struct stash_t *stash_get(__u64 id)
{
    return active.lookup(&id);
}
static __always_inline int stash_put(__u64 id, struct stash_t *st)
{
    return active.update(&id, st);
}
static __always_inline void stash_drop(__u64 id, struct stash_t *sp)
{
    active.delete(&id);
}
#endif
BPF_TABLE("lru_hash", __u64, struct sk_addr_t, sk_addrs, MAX_CONNS);
BPF_PERCPU_ARRAY(scratch, struct data_event, 1);
BPF_PERCPU_ARRAY(counters, __u64, CNT_MAX);
/* Selection: config[CFG_SELECT] is a bit set. Nothing is traced until user space sets
 * SELECT_ENABLED (after filling pid_filter): BCC attaches the programs while loading,
 * before the filter could be written, and that window must not leak other processes.
 * With SELECT_PID_FILTER only tgids present in pid_filter are traced. SELF_TGID (the
 * daemon) is always excluded at compile time. With SELECT_PORT_FILTER a connection
 * whose local and remote ports are both known and both absent from port_filter emits
 * nothing (conn_select in syscalls.c; its verdict is cached in conn_t.flags). */
#define CFG_SELECT 0
#define SELECT_ENABLED 1
#define SELECT_PID_FILTER 2
#define SELECT_PORT_FILTER 4
/* With SELECT_PID_IGNORE the tgids in pid_ignored are not traced: processes service
 * discovery (otel_ebpf/discovery.py) judged not to report, written by user space when it
 * first sees them. sched_process_exec / _exit (syscalls.c) delete a process's entry, so
 * a new program or a reused pid is judged anew; exec'd tgids are listed in select_execs
 * (LRU) for user space to re-resolve. */
#define SELECT_PID_IGNORE 8
/* config[CFG_FAST_PATH] != 0: connections accepted/connected from now on may be served
 * by the kernel fast path (http1_fast.h); 0 (default) keeps every one on the chunk
 * stream. Read at accept/connect only. */
#define CFG_FAST_PATH 1
#define CFG_MAX 4
BPF_ARRAY(config, __u64, CFG_MAX);
BPF_HASH(pid_filter, __u32, __u8, 4096);
#ifndef MAX_PORT_FILTER
#define MAX_PORT_FILTER 1024
#endif
BPF_HASH(port_filter, __u16, __u8, MAX_PORT_FILTER);
BPF_HASH(pid_ignored, __u32, __u8, 16384);
BPF_TABLE("lru_hash", __u32, __u64, select_execs, 4096);

static __always_inline void counter_add(__u32 idx, __u64 n)
{
    __u64 *c = counters.lookup(&idx);
    if (c)
        *c += n;
}

#endif /* OTEL_EBPF_MAPS_H */
