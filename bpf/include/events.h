/* The kernel <-> Python contract: every record the BPF programs put on the ring buffer.
 *
 * Rules: fixed-width types only, no kernel headers, explicit
 * padding, never packed. The first byte of every record is its kind; user space
 * (otel_ebpf/capture/reader.py) switches on it. Numbers match the IntEnums in
 * otel_ebpf/capture/events.py; tests/unit/test_events_layout.py compiles this file with
 * gcc and checks every offset against the Python decoder.
 *
 * Userspace includers must provide __u8..__u64/__s32 first (#include <linux/types.h>).
 */
#ifndef OTEL_EBPF_EVENTS_H
#define OTEL_EBPF_EVENTS_H

/* Compile-time knobs, passed as -D flags by otel_ebpf/capture/loader.py. */
#ifndef MAX_CAPTURE_BYTES
#define MAX_CAPTURE_BYTES 4096 /* bytes captured per chunk; must be a power of two */
#endif
#if (MAX_CAPTURE_BYTES & (MAX_CAPTURE_BYTES - 1)) != 0 || MAX_CAPTURE_BYTES < 16
#error "MAX_CAPTURE_BYTES must be a power of two >= 16"
#endif

/* Record kinds: first byte of every ring-buffer record (EventKind). */
#define EVENT_CONN_OPEN 1
#define EVENT_DATA 2
#define EVENT_CONN_CLOSE 3
#define EVENT_EXCHANGE 4 /* the kernel fast path: one whole request/response pair */

/* Role (Role). */
#define ROLE_UNKNOWN 0 /* socket opened before we attached: user space infers it */
#define ROLE_SERVER 1  /* from accept/accept4 */
#define ROLE_CLIENT 2  /* from connect */

/* Direction (Direction). */
#define DIR_INGRESS 0 /* read/recv*: bytes the traced process received */
#define DIR_EGRESS 1  /* write, send*, sendfile: bytes it sent */

/* Source (Source). */
#define SOURCE_SYSCALL 0
#define SOURCE_OPENSSL 1

/* Application protocol of a byte stream (Protocol), as the kernel's inference
 * (bpf/protocol_infer.h) decided it; user space picks the protocol's session by it.
 * PROTOCOL_LIST: one line per protocol the kernel recognises. */
#define PROTO_UNKNOWN 0  /* not decided yet (first bytes too short to say) */
#define PROTO_HTTP1 1    /* HTTP/1.x: a request line or a status line */
#define PROTO_NOT_HTTP 2 /* given up: nothing of it is emitted */
#define PROTO_HTTP2 3    /* HTTP/2: the client connection preface or a server's first SETTINGS */

/* Address families as the kernel numbers them (AF_INET, AF_INET6). */
#define OTEL_AF_INET 2
#define OTEL_AF_INET6 10

/* EVENT_CONN_OPEN: emitted once per connection, right before its first emitted data
 * event (so non-HTTP connections cost no ring-buffer traffic at all). Addresses are
 * what the kernel knew by then: family 0 means unknown (user space falls back to
 * /proc). For AF_INET the address is in the first 4 bytes. Ports in host order. */
struct conn_open_event {
    __u8 kind;      /* EVENT_CONN_OPEN */
    __u8 role;      /* ROLE_* */
    __u8 source;    /* SOURCE_* */
    __u8 protocol;  /* PROTO_* inferred for this source's stream when the open was
                       emitted; PROTO_UNKNOWN when its first chunk was too short to say */
    __u32 tgid;
    __u32 tid;
    __s32 fd;
    __u64 generation;   /* together with (tgid, fd): the connection id */
    __u64 timestamp_ns; /* accept/connect return, or first sight for older sockets */
    __u16 family;       /* 0 unknown, OTEL_AF_INET, OTEL_AF_INET6 */
    __u16 local_port;
    __u16 remote_port;
    __u16 _pad1;
    __u8 local_addr[16];
    __u8 remote_addr[16];
    char comm[16]; /* the opening thread's name (task comm), NUL-padded: names processes
                      that exit before user space can read /proc (curl) */
    /* Where the emitted byte streams begin, by DIR_*: 0 for a connection that was on
     * the chunk stream from its start; the positions of a message boundary for one that
     * the kernel fast path served first and then handed over (user space expects its
     * first DATA there, not at 0, and sees no gap). */
    __u64 stream_start[2];
};

/* EVENT_DATA header; followed by captured_len bytes of data (the record is
 * variable-length: header + captured bytes, so ring-buffer traffic is proportional to
 * what was captured). size - captured_len bytes were moved but not captured.
 * On a PROTO_HTTP2 stream the captured bytes are followed by frame_hints struct
 * h2_frame_hint entries (bpf/http2_walk.h): the frame headers the kernel read in the
 * uncaptured part, in stream order, so user space keeps the framing across it. */
struct data_event_hdr {
    __u8 kind;      /* EVENT_DATA */
    __u8 direction; /* DIR_* */
    __u8 source;    /* SOURCE_* */
    __u8 role;      /* ROLE_* of the connection (also in its open event) */
    __u32 tgid;
    __u32 tid;
    __s32 fd;
    __u64 generation;
    __u64 timestamp_ns; /* when the syscall (or SSL call) returned */
    __u64 position;     /* offset of this chunk's first byte in its direction's stream */
    __u64 size;         /* bytes the call really moved for this chunk */
    __u32 captured_len; /* bytes that follow the header, <= MAX_CAPTURE_BYTES */
    __u16 frame_hints;  /* struct h2_frame_hint entries after the captured bytes */
    __u16 _pad0;
};

struct data_event {
    struct data_event_hdr hdr;
    __u8 data[MAX_CAPTURE_BYTES];
};

/* One HTTP/2 frame header the kernel read in a chunk's uncaptured part (or straddling
 * its captured end): header_len bytes of it as on the wire (9; 1..8 for a header the
 * chunk ends in, the rest being the next chunk's first bytes) at `offset` from the
 * chunk's first byte. Entries are unaligned in the record (they follow the captured
 * bytes). */
#ifndef H2_HINTS_MAX
#define H2_HINTS_MAX 64 /* frame headers handed over per chunk; more: the walk stops */
#endif
struct h2_frame_hint {
    __u32 offset;
    __u8 header[9];
    __u8 header_len;
    __u8 _pad[2];
};

/* The record as the HTTP/2 frame walk builds it: room for the hints too. */
struct data_event_h2 {
    struct data_event_hdr hdr;
    __u8 data[MAX_CAPTURE_BYTES + H2_HINTS_MAX * sizeof(struct h2_frame_hint)];
};

/* EVENT_CONN_CLOSE: only for connections whose open event was emitted. */
struct conn_close_event {
    __u8 kind;   /* EVENT_CONN_CLOSE */
    __u8 source; /* SOURCE_* */
    __u8 reset;  /* 1: a read/write on it returned ECONNRESET or EPIPE (SOURCE_SYSCALL) */
    __u8 _pad0;
    __u32 tgid;
    __u32 tid;
    __s32 fd;
    __u64 generation;
    __u64 timestamp_ns;
    __u64 bytes_sent;     /* total bytes the process sent on it (incl. not emitted) */
    __u64 bytes_received; /* total bytes it received */
};

/* EVENT_EXCHANGE: one HTTP/1.x request and its complete response, paired in the
 * kernel (the fast path). Followed by head_len bytes: the whole request head, request
 * line through the empty line. Offsets below index those bytes; a length of 0 means
 * the header was absent. Header values have their surrounding whitespace trimmed.
 * Timing as for the chunk stream: start = return of the syscall (or SSL call) that
 * moved the first request byte, end = return of the one that moved the last response
 * byte. Body sizes are exact (counted in the kernel against Content-Length). */
#ifndef REQ_HEAD_MAX
#define REQ_HEAD_MAX 1024 /* request heads longer than this take the chunk stream */
#endif
#if (REQ_HEAD_MAX & (REQ_HEAD_MAX - 1)) != 0 || REQ_HEAD_MAX < 64 || REQ_HEAD_MAX > 1024
#error "REQ_HEAD_MAX must be a power of two between 64 and 1024 (the verifier's budget)"
#endif
struct exchange_event_hdr {
    __u8 kind;          /* EVENT_EXCHANGE */
    __u8 role;          /* ROLE_SERVER or ROLE_CLIENT */
    __u8 source;        /* SOURCE_* */
    __u8 version_minor; /* x of the request line's HTTP/1.x */
    __u32 tgid;
    __u32 tid;          /* server: thread that read the first request byte; client: wrote it */
    __s32 fd;
    __u64 generation;
    __u64 start_ns;
    __u64 end_ns;
    __u64 request_body_size;
    __u64 response_body_size;
    __u16 status;       /* final status code, 200..599 (1xx never take the fast path) */
    __u16 family;       /* 0 unknown, OTEL_AF_INET, OTEL_AF_INET6 */
    __u16 local_port;
    __u16 remote_port;
    __u8 local_addr[16];
    __u8 remote_addr[16];
    char comm[16];      /* the task name of the thread that emitted the record */
    __u16 head_len;     /* request head bytes that follow this header */
    __u16 method_len;   /* method = head[0, method_len) */
    __u16 target_off;
    __u16 target_len;
    __u16 host_off;
    __u16 host_len;
    __u16 user_agent_off;
    __u16 user_agent_len;
    __u16 traceparent_off;
    __u16 traceparent_len;
    __u16 tracestate_off;
    __u16 tracestate_len;
};

struct exchange_event {
    struct exchange_event_hdr hdr;
    __u8 head[REQ_HEAD_MAX];
};

#ifndef RESP_HEAD_MAX
#define RESP_HEAD_MAX 512 /* response heads longer than this take the chunk stream */
#endif
#if (RESP_HEAD_MAX & (RESP_HEAD_MAX - 1)) != 0 || RESP_HEAD_MAX < 64 || RESP_HEAD_MAX > REQ_HEAD_MAX
#error "RESP_HEAD_MAX must be a power of two between 64 and REQ_HEAD_MAX"
#endif

/* An exchange in flight in the kernel fast path (bpf/http1_fast.h), in the map
 * `pending` keyed like conns (tgid, fd). User space reads it once a second to report a
 * request that got no answer within conntrack.request_timeout_s (and deletes the entry:
 * the kernel then hands the connection to the chunk stream at its next bytes). */
struct pending_t {
    __u8 req[REQ_HEAD_MAX];   /* captured bytes of the request's first chunk */
    __u8 resp[RESP_HEAD_MAX]; /* captured bytes of the response's first chunk; also
                                 the slack the 24-byte name loads may run into */
    __u64 generation;         /* conn_t.generation: an entry of a reused fd is stale */
    __u64 start_ns;
    __u64 req_pos;            /* stream position of the request's first byte */
    __u64 resp_pos;           /* ... of the response's first byte (resp_cap > 0) */
    __u64 req_body;
    __u64 resp_body;
    __u32 tid;
    __u16 req_cap;            /* bytes in req[] */
    __u16 resp_cap;           /* bytes in resp[]; 0: no response yet */
    __u16 head_len;
    __u16 method_len;
    __u16 target_off;
    __u16 target_len;
    __u16 hv_off[4];          /* H_HOST.. H_TRACESTATE: trimmed value offsets */
    __u16 hv_len[4];
    __u16 status;
    __u8 version_minor;
    __u8 is_head;             /* HEAD request: the response has no body */
    __u8 role;                /* ROLE_* of the connection */
    __u8 source;              /* SOURCE_* that carries the exchange */
    __u8 _pad[2];
};

/* Loss and health counters: indexes into the per-CPU array `counters`. User space
 * sums the CPUs (Capture.loss_counters()); names there are the lower-case suffixes. */
#define CNT_RINGBUF_FULL 0      /* records dropped: ring buffer output failed */
#define CNT_TRUNCATED_EVENTS 1  /* data events with captured_len < size */
#define CNT_TRUNCATED_BYTES 2   /* bytes moved but not captured */
#define CNT_CONN_TABLE_FULL 3   /* connections not tracked: table full */
#define CNT_IOVEC_SKIPPED 4     /* vectored calls with more segments than we walk */
#define CNT_MMSG_SKIPPED 5      /* recvmmsg/sendmmsg messages after the first */
#define CNT_STASH_FULL 6        /* syscalls missed: in-flight argument table full */
#define CNT_CONN_RESET 7        /* ECONNRESET/EPIPE returned on a tracked connection */
#define CNT_NOT_HTTP 8          /* connections given up by protocol inference */
#define CNT_READ_FAULT 9        /* bpf_probe_read_user failed on a data buffer */
#define CNT_FAST_EXCHANGES 10   /* EVENT_EXCHANGE records emitted by the fast path */
#define CNT_FAST_FALLBACKS 11   /* connections handed from the fast path to the chunk stream */
#define CNT_PENDING_FULL 12     /* request heads not taken: the `pending` table was full */
/* Why the fast path handed over (each fallback counts one of these too): */
#define CNT_FB_REQUEST 13       /* request head refused (malformed, too long, CONNECT, ...) */
#define CNT_FB_RESPONSE 14      /* response head refused (1xx, chunked, no length, ...) */
#define CNT_FB_OVERRUN 15       /* more bytes than the message: pipelining, framing error */
#define CNT_FB_ORDER 16         /* bytes in an unexpected direction (early response, ...) */
#define CNT_FB_CLOSED 17        /* closed mid-exchange */
#define CNT_FB_OTHER 18         /* sendfile/recvmmsg/sendmmsg at a head, pending lost */
#define CNT_SELECT_DROPPED 19   /* connections dropped in the kernel by port selection */
#define CNT_H2_WALK_LOST 20      /* HTTP/2 frame walks that fell out of step (or too many frames) */
#define CNT_H2_FRAME_HINTS 21    /* frame headers read in uncaptured bytes, handed over */
#define CNT_MAX 22

#endif /* OTEL_EBPF_EVENTS_H */
