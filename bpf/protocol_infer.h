/* In-kernel protocol inference (HTTP/1.x, HTTP/2): a cheap filter, not a parser.
 *
 * A chunk looks like HTTP when its first bytes are a request line start (every RFC 9110
 * method, plus PATCH, followed by a space; or an unknown all-uppercase token followed by
 * " /", which user space reports as `_OTHER`) or a response start ("HTTP/1.").
 * Everything is decided on the first 8 bytes loaded as one little-endian u64, so the
 * known-method check is a handful of mask-and-compare instructions.
 *
 * PREFIX means "too short to say, but still possible" (e.g. a client writing "G", "E",
 * "T", " " one byte per syscall): the caller keeps accumulating the stream's first
 * bytes instead of counting the chunk as non-HTTP. Unknown methods longer than 6
 * letters (PROPFIND) are PREFIX on their first 8 bytes: user space's parser judges.
 *
 * HTTP/2 (INFER_HTTP2) is recognised at a stream's start only, on the same 8 bytes:
 *   - the client connection preface "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", decided on
 *     "PRI * HT", in either direction (the client writes it, the server reads it);
 *   - the first SETTINGS frame a server writes, often before it reads the preface (Go,
 *     nghttpd), so its client may well read it before writing the preface: length
 *     < 256 and a multiple of 6, type 0x04, flags 0, stream 0 (the frame header's first
 *     8 of 9 bytes). Only asked for on the bytes a server sends (server_bytes(): its
 *     egress, its client's ingress): an 8-byte pattern of mostly zeros is too weak
 *     elsewhere.
 * Prior knowledge and ALPN h2 both start so; `Upgrade: h2c` starts as HTTP/1.x and user
 * space switches on the 101. Connections older than us are not recognised as HTTP/2
 * mid-stream (no frame has a pattern this cheap).
 *
 * Adding a protocol: an infer_<name>() below, one INFER_<NAME> result, and one line in
 * infer_proto() and infer_protocol_id(); its PROTO_* id lives in include/events.h; the
 * places that decide what is emitted are marked PROTOCOL_LIST.
 */
#ifndef OTEL_EBPF_PROTOCOL_INFER_H
#define OTEL_EBPF_PROTOCOL_INFER_H

#define INFER_NO 0
#define INFER_PREFIX 1
#define INFER_MATCH 2 /* HTTP/1.x */
#define INFER_HTTP2 3

#define P8(a, b, c, d, e, f, g, h)                                                     \
    ((__u64)(a) | ((__u64)(b) << 8) | ((__u64)(c) << 16) | ((__u64)(d) << 24) |         \
     ((__u64)(e) << 32) | ((__u64)(f) << 40) | ((__u64)(g) << 48) | ((__u64)(h) << 56))

static __always_inline __u64 byte_mask(__u32 n)
{
    return n >= 8 ? ~0ULL : ((1ULL << (n * 8)) - 1);
}

/* Does v (n valid bytes) start with pattern pat of length len? */
static __always_inline int infer_pattern(__u64 v, __u32 n, __u64 pat, __u32 len)
{
    __u64 m = byte_mask(n) & byte_mask(len);
    if (((v ^ pat) & m) != 0)
        return INFER_NO;
    return n >= len ? INFER_MATCH : INFER_PREFIX;
}

static __always_inline int infer_http(__u64 v, __u32 n)
{
    int best = INFER_NO, r;
    if (n == 0)
        return INFER_PREFIX;
#define TRY(pat, len)                                                                   \
    r = infer_pattern(v, n, pat, len);                                                  \
    if (r == INFER_MATCH)                                                               \
        return INFER_MATCH;                                                             \
    if (r > best)                                                                       \
        best = r;
    TRY(P8('G', 'E', 'T', ' ', 0, 0, 0, 0), 4)
    TRY(P8('H', 'T', 'T', 'P', '/', '1', '.', 0), 7)
    TRY(P8('P', 'O', 'S', 'T', ' ', 0, 0, 0), 5)
    TRY(P8('P', 'U', 'T', ' ', 0, 0, 0, 0), 4)
    TRY(P8('H', 'E', 'A', 'D', ' ', 0, 0, 0), 5)
    TRY(P8('D', 'E', 'L', 'E', 'T', 'E', ' ', 0), 7)
    TRY(P8('P', 'A', 'T', 'C', 'H', ' ', 0, 0), 6)
    TRY(P8('O', 'P', 'T', 'I', 'O', 'N', 'S', ' '), 8)
    TRY(P8('C', 'O', 'N', 'N', 'E', 'C', 'T', ' '), 8)
    TRY(P8('T', 'R', 'A', 'C', 'E', ' ', 0, 0), 6)
#undef TRY
    /* Unknown method: 1..6 uppercase letters, a space, then '/'. */
    {
        int state = 0; /* 0: in token, 1: after the space */
        __u32 i;
#pragma unroll
        for (i = 0; i < 8; i++) {
            __u8 c = (v >> (i * 8)) & 0xff;
            if (i >= n)
                return best > INFER_PREFIX ? best : INFER_PREFIX;
            if (state == 0) {
                if (c >= 'A' && c <= 'Z')
                    continue;
                if (c == ' ' && i >= 1) {
                    state = 1;
                    continue;
                }
                return best;
            }
            return c == '/' ? INFER_MATCH : best;
        }
        /* 8 letters, or 7 and a space: a longer unknown method (PROPFIND, PROPPATCH)
         * may still follow. Emitted for user space's parser to judge; a stream that is
         * not HTTP fails the next chunks' inference and is given up as usual. */
        return best > INFER_PREFIX ? best : INFER_PREFIX;
    }
}

/* HTTP/2's first bytes: the preface, or (settings != 0) a server's first SETTINGS. */
static __always_inline int infer_http2(__u64 v, __u32 n, int settings)
{
    int r = infer_pattern(v, n, P8('P', 'R', 'I', ' ', '*', ' ', 'H', 'T'), 8);
    if (r == INFER_MATCH)
        return INFER_HTTP2;
    if (r == INFER_PREFIX || !settings)
        return r;
    /* 00 00 LL 04 00 00 00 00: every byte but the length's low one is fixed; one
     * branch for it all (each branch here multiplies the verifier's paths after it) */
    __u64 m = byte_mask(n);
    __u64 bad = ((v ^ P8(0, 0, 0, 0x04, 0, 0, 0, 0)) & P8(0xff, 0xff, 0, 0xff, 0xff, 0xff, 0xff, 0xff) & m) |
                (((v & m) >> 16) & 0xff) % 6;
    if (bad)
        return INFER_NO;
    return n >= 8 ? INFER_HTTP2 : INFER_PREFIX;
}

/* Do the bytes of direction d (DIR_*) on a connection of this role come from the
 * server? Either direction when the role is unknown. */
static __always_inline int server_bytes(__u8 d, __u8 role)
{
    return d == DIR_EGRESS ? role != ROLE_CLIENT : role != ROLE_SERVER;
}

/* PROTOCOL_LIST: one line per protocol below and in infer_protocol_id().
 * What the first n (<= 8) bytes v of a stream say: INFER_NO, INFER_PREFIX, INFER_MATCH
 * (HTTP/1.x) or INFER_HTTP2. `settings`: this is where a server's first bytes go out. */
static __always_inline int infer_proto(__u64 v, __u32 n, int settings)
{
    int r = infer_http(v, n);
    if (r == INFER_MATCH)
        return r;
    int r2 = infer_http2(v, n, settings);
    return r2 > r ? r2 : r;
}

/* The PROTO_* (include/events.h) of a matching inference result. */
static __always_inline __u8 infer_protocol_id(int r)
{
    return r == INFER_HTTP2 ? PROTO_HTTP2 : PROTO_HTTP1;
}

#endif /* OTEL_EBPF_PROTOCOL_INFER_H */
