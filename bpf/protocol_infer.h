/* In-kernel HTTP/1.x inference: a cheap filter, not a parser.
 *
 * A chunk looks like HTTP when its first bytes are a request line start (every RFC 9110
 * method, plus PATCH, followed by a space; or an unknown all-uppercase token followed by
 * " /", which user space reports as `_OTHER`) or a response start ("HTTP/1.").
 * Everything is decided on the first 8 bytes loaded as one little-endian u64, so the
 * known-method check is a handful of mask-and-compare instructions.
 *
 * PREFIX means "too short to say, but still possible" (e.g. a client writing "G", "E",
 * "T", " " one byte per syscall): the caller keeps accumulating the stream's first
 * bytes instead of counting the chunk as non-HTTP. Limitation: unknown methods longer
 * than 6 letters (PROPFIND) are not recognised by the heuristic.
 */
#ifndef OTEL_EBPF_PROTOCOL_INFER_H
#define OTEL_EBPF_PROTOCOL_INFER_H

#define INFER_NO 0
#define INFER_PREFIX 1
#define INFER_MATCH 2

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
    }
    return best;
}

#endif /* OTEL_EBPF_PROTOCOL_INFER_H */
