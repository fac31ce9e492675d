/* The kernel fast path: settle a plain HTTP/1.x exchange in BPF, one EVENT_EXCHANGE
 * record per request/response pair instead of DATA records per chunk.
 *
 * Included by bpf/syscalls.c after its emission helpers (emit_data_at, conn_addrs,
 * conn_ensure_open_at, rb_flags, counter_add) and before conn_close, which replays an
 * exchange cut short by close(2). Called from data_exit (SOURCE_SYSCALL, conn->pos)
 * and from openssl.h's fd-tied path (SOURCE_OPENSSL, conn->tls_pos).
 *
 * States (conn_t.fast, maps.h): FAST_IDLE -> request head -> FAST_REQ (request body
 * counted down in fast_left) -> response head -> FAST_RESP (response body counted down)
 * -> record emitted -> FAST_IDLE. The request direction is DIR_INGRESS for servers and
 * DIR_EGRESS for clients. Bodies are framed by Content-Length only (none: 0 for
 * requests; 0 for HEAD/204/304 responses); anything else is handed over.
 *
 * Hand-over (fast_fallback): the connection becomes FAST_OFF for good, its CONN_OPEN
 * carries stream_start = where the chunk stream begins (the in-flight request's first
 * byte, or the current positions at a message boundary), and an exchange in flight is
 * replayed as one DATA record per direction: its real size and timestamp, the stored
 * head bytes as captured data (the rest is reported uncaptured, which keeps body
 * lengths exact for user space). The chunk that caused the hand-over then takes the
 * chunk stream unchanged.
 *
 * Data that does not look like HTTP where a head is expected (protocol_infer.h says
 * INFER_NO: a TLS handshake on a socket whose plaintext comes through the OpenSSL
 * uprobes) leaves the fast state alone and takes the chunk stream's inference. Chunks
 * from the other source than the one serving the exchange are also left alone.
 *
 * Parsing (head_parse): no bpf_loop (BCC 0.26 does not relocate callback pointers),
 * so bounded loops the verifier walks once per iteration: a word-at-a-time pass over
 * the head (SWAR: every check of the 8 bytes is arithmetic, a handful of branches per
 * word, so REQ_HEAD_MAX 4096 stays far from the verifier's 8192 pending-branch limit),
 * then one pass over the header lines: a line whose first letter starts none of the
 * names wanted is passed over, the others are compared (24 bytes, case-insensitive)
 * with the names that start with that letter only.
 *
 * Compile-time flags: REQ_HEAD_MAX (events.h), RESP_HEAD_MAX, MAX_PENDING.
 */
#ifndef OTEL_EBPF_HTTP1_FAST_H
#define OTEL_EBPF_HTTP1_FAST_H

#ifndef MAX_PENDING
#define MAX_PENDING 8192 /* exchanges in flight at once; beyond, the chunk stream */
#endif
/* Lines per head (request/status line + headers + the empty line); more: hand over. */
#define HEAD_LINES_MAX 64

/* struct pending_t (an exchange in flight) is in include/events.h: user space reads it
 * to report requests that never got an answer. */

/* Header names the parser knows (indexes of fast_scratch_t.vo/ve). */
#define H_HOST 0
#define H_USER_AGENT 1
#define H_TRACEPARENT 2
#define H_TRACESTATE 3
#define H_CONTENT_LENGTH 4
#define H_TRANSFER_ENCODING 5

/* Bit (c | 0x20) & 63 for the first letter c of each name head_parse looks for, either
 * case ('c' is 0x63, bit 35): lines starting otherwise are not compared at all. */
#define LETTER_BIT(c) (1ULL << ((c) & 63))
#define FIRST_LETTERS_RESPONSE (LETTER_BIT('c') | LETTER_BIT('t'))
#define FIRST_LETTERS_REQUEST (FIRST_LETTERS_RESPONSE | LETTER_BIT('h') | LETTER_BIT('u'))

/* Per-CPU work area: the pending entry being built (p.req is the parse buffer for
 * request and response heads alike, so the parser's loops exist once per program)
 * and the parser's results. */
struct fast_scratch_t {
    struct pending_t p;
    /* positions of the head's LF bytes; twice the lines: pass 1 writes up to three
     * slots past the count, which must not wrap onto line 0's */
    __u16 lf[HEAD_LINES_MAX * 2];
    __u16 vo[8];              /* raw [vo, ve) of each H_* value, then trimmed */
    __u16 ve[8];
    __u64 cl;                 /* Content-Length */
    __u64 bad;                /* pass 1: refused bytes (0x80 marks) */
    __u32 seen;               /* bit per H_* present */
    __u32 nl;                 /* pass 1: LFs recorded */
    __u32 end;                /* pass 1: head length, 0 = no empty line */
    __u64 e2;                 /* pass 1: the last word's empty-line LF marks */
    __u32 e2_base;            /* ... and where that word starts */
    __u32 sp0;                /* line0_count: spaces and tabs on line 0 */
    __u32 ht0;
    __u32 m;                  /* method length */
    __u64 first;              /* pass 2: FIRST_LETTERS_* of this head */
    /* fast_chunk's inputs, parked across the parse (READ_BACK) */
    __u64 a_size;
    __u64 a_cap;
    __u64 a_pos;
    __u64 a_now;
    __u32 a_tid;
    __u32 a_response;
    __u16 status;
    __u8 minor;
    __u8 _pad;
};

/* Loops' results go through map memory and are read back with a volatile load: the
 * verifier then holds an unknown value rather than one whose range differs with the
 * iteration the loop left at, so the code after a loop is verified once instead of
 * once per exit. */
#define READ_BACK(x) (*(volatile typeof(x) *)&(x))

BPF_HASH(pending, struct conn_key_t, struct pending_t, MAX_PENDING);
BPF_PERCPU_ARRAY(fast_scratch, struct fast_scratch_t, 1);
BPF_PERCPU_ARRAY(xscratch, struct exchange_event, 1);

/* ---- SWAR helpers: 8 bytes at a time, results as 0x80 in each matching byte -------- */

#define ONES8 0x0101010101010101ULL
#define HIGHS8 0x8080808080808080ULL
#define LOWS8 0x7f7f7f7f7f7f7f7fULL

/* bytes of w equal to b (exact: no false positives next to a match) */
static __always_inline __u64 swar_eq(__u64 w, __u64 b)
{
    __u64 z = w ^ (b * ONES8);
    return ~(((z & LOWS8) + LOWS8) | z | LOWS8);
}

/* bytes of w below n (1 <= n <= 0x80) */
static __always_inline __u64 swar_lt(__u64 w, __u64 n)
{
    return ~(((w & LOWS8) + (0x80 - n) * ONES8) | w) & HIGHS8;
}

/* number of marked bytes in a 0x80 mask */
static __always_inline __u32 swar_count(__u64 m)
{
    return (__u32)((((m >> 7) & ONES8) * ONES8) >> 56);
}

/* 1 when x != 0. In asm: clang turns every C spelling of this into a compare, and a
 * compare into a branch (BPF has no setcc), one more pending path per word. */
static __always_inline __u64 nonzero(__u64 x)
{
    __u64 r;
    asm volatile("%0 = %1\n%0 = -%0\n%0 |= %1\n%0 >>= 63" : "=&r"(r) : "r"(x));
    return r;
}

/* x, with clang no longer knowing anything about it (no compare-and-branch rewrite) */
static __always_inline __u64 opaque(__u64 x)
{
    asm volatile("" : "+r"(x));
    return x;
}

/* index of the byte holding the single bit `low` (a 0x80 bit; 0 for none): the
 * multiply moves byte k of 0x0001..07, which is k, to the top */
static __always_inline __u32 swar_index(__u64 low)
{
    return (__u32)(((low >> 7) * 0x0001020304050607ULL) >> 56);
}

/* The mask is what bounds the access for the verifier; the empty asm before it keeps
 * clang from dropping it where clang can prove the offset small by a route the
 * verifier cannot follow. */
static __always_inline __u64 head_word(struct fast_scratch_t *fs, __u32 off)
{
    /* unaligned 8-byte load inside the map value: req[] is followed by resp[] (>= 64
     * bytes), so off < REQ_HEAD_MAX + 24 stays in bounds */
    __u64 i = off;
    asm volatile("" : "+r"(i));
    const __u64 *q = (const __u64 *)&fs->p.req[i & (REQ_HEAD_MAX - 1)];
    /* clang keeps the byte array's alignment (1) through the cast and splits the load
     * into eight byte loads and fourteen shifts and ors; once it no longer knows where
     * q points, the load is one instruction (the kernel allows unaligned loads from
     * map values unless the program asks for strict alignment) */
    asm volatile("" : "+r"(q));
    return *q;
}

static __always_inline __u8 head_byte(struct fast_scratch_t *fs, __u32 off)
{
    __u64 i = off;
    asm volatile("" : "+r"(i));
    return fs->p.req[i & (REQ_HEAD_MAX - 1)];
}

/* Lower-case compare of a header line's first 24 bytes with "name:" (n <= 24 bytes
 * including the colon). Letters match either case; other bytes exactly. */
#define NC(s, i) ((__u64)((i) < sizeof(s) - 1 ? (__u8)(s)[i] : 0))
#define NL(s, i) ((i) < sizeof(s) - 1 && (s)[i] >= 'a' && (s)[i] <= 'z' ? 0x20ULL : 0)
#define NK(s, i) ((i) < sizeof(s) - 1 ? 0xffULL : 0)
#define NW(F, s, o)                                                                    \
    (F(s, o) | F(s, o + 1) << 8 | F(s, o + 2) << 16 | F(s, o + 3) << 24 |              \
     F(s, o + 4) << 32 | F(s, o + 5) << 40 | F(s, o + 6) << 48 | F(s, o + 7) << 56)
#define NAME_DIFF(w0, w1, w2, s)                                                       \
    ((((w0) | NW(NL, s, 0)) ^ NW(NC, s, 0)) & NW(NK, s, 0) |                            \
     (((w1) | NW(NL, s, 8)) ^ NW(NC, s, 8)) & NW(NK, s, 8) |                            \
     (((w2) | NW(NL, s, 16)) ^ NW(NC, s, 16)) & NW(NK, s, 16))
/* 1 when the line starts with "name:" (no branch: see nonzero()) */
#define NAME_IS(w0, w1, w2, s) (1 - nonzero(NAME_DIFF(w0, w1, w2, s)))

/* Trim SP/HT around [vo[id], ve[id]); 0 when either side has 8 or more (rare; the
 * chunk stream takes those). No loops: the first non-blank byte of the 8 from vo (the
 * CR at ve stops it), the last non-blank of the 8 before ve (the colon stops it). */
static __always_inline int head_trim(struct fast_scratch_t *fs, int id)
{
    __u32 o = fs->vo[id & 7], e = fs->ve[id & 7];
    __u64 w = head_word(fs, o);
    __u64 keep = ~(swar_eq(w, ' ') | swar_eq(w, '\t')) & HIGHS8;
    if (!keep)
        return 0;
    o += swar_index(keep & -keep);
    w = head_word(fs, e - 8);
    keep = ~(swar_eq(w, ' ') | swar_eq(w, '\t')) & HIGHS8;
    if (!keep)
        return 0;
    keep |= keep >> 8;
    keep |= keep >> 16;
    keep |= keep >> 32; /* every byte up to the last non-blank one */
    e = e - 8 + swar_count(keep);
    if (e < o)
        e = o;
    fs->vo[id & 7] = o;
    fs->ve[id & 7] = e;
    return 1;
}

/* Spaces and tabs among line 0's first lf0 bytes (the request line up to its CR LF)
 * into fs->sp0 and fs->ht0. Requests only: pass 1 no longer counts them on every word
 * of every head. */
static __always_inline void line0_count(struct fast_scratch_t *fs, __u32 lf0)
{
    __u32 sp = 0, ht = 0;
#pragma clang loop unroll(disable)
    for (__u32 j = 0; j < REQ_HEAD_MAX / 8; j++) {
        __u32 base = j * 8;
        __u64 w = head_word(fs, base);
        __u64 r = lf0 - base; /* line 0's bytes from base on: the loop stops at its end */
        asm volatile("" : "+r"(r));
        __u64 part = HIGHS8 & ((1ULL << ((r & 7) * 8)) - 1);
        __u64 hm = HIGHS8 ^ ((HIGHS8 ^ part) & -opaque((r - 8) >> 63));
        sp += swar_count(swar_eq(w, ' ') & hm);
        ht += swar_count(swar_eq(w, '\t') & hm);
        if (opaque((r - 9) >> 63))
            break;
    }
    fs->sp0 = sp;
    fs->ht0 = ht;
}

/* Parse the head at the start of fs->p.req (p.req_cap captured bytes): a request head
 * (response == 0) or a response head. Returns the head's length (request/status line
 * through the empty line) or 0 when the fast path must not take it. Results in fs:
 * seen/vo/ve per H_*, cl, status, minor, and for requests p.method_len, p.target_*,
 * p.is_head. Everything it reads comes from fs, and the caller parks its own state
 * there too: the verifier then walks the parser once, not once per path into it. */
static __always_inline __u32 head_parse(struct fast_scratch_t *fs)
{
    /* from memory: a register copy would share its range with the caller's size,
     * which the loop below narrows differently at every exit */
    __u32 len = READ_BACK(fs->p.req_cap);
    __u64 bad = 0, carry_cr = 0, carry_lf = 0;
    __u32 nl = 0;

    /* Pass 1, a word at a time: find the empty line, record every LF, and refuse NUL
     * and other controls, bare CR or LF (obs-fold, a line starting with SP or HT, is
     * pass 2's: it reads every line's first byte anyway). Bytes after the head (a body in
     * the same chunk) are not looked at. Branch-free but for the exit: one pending
     * branch per word for the verifier, and its states at the loop head differ only in
     * the counter. Every instruction here runs once per 8 bytes of every head (~14 ns
     * a word, tests/benchmark/bpf_cost.py): what is needed once per head (the end's
     * offset, line 0's spaces) is worked out after the loop. */
#pragma clang loop unroll(disable)
    for (__u32 j = 0; j < REQ_HEAD_MAX / 8; j++) {
        __u32 base = j * 8;
        __u64 w = head_word(fs, base);
        __u64 r = len - base; /* >= 1: the loop stops before base reaches len */
        asm volatile("" : "+r"(r));
        __u64 part = HIGHS8 & ((1ULL << ((r & 7) * 8)) - 1);
        __u64 hm = HIGHS8 ^ ((HIGHS8 ^ part) & -opaque((r - 8) >> 63)); /* bytes < len */
        __u64 lf = swar_eq(w, '\n') & hm;
        __u64 cr = swar_eq(w, '\r') & hm;
        /* LF two bytes after an LF (the CR between is checked below): the empty line */
        __u64 e2 = lf & ((lf << 16) | (carry_lf >> 48));
        __u64 low = e2 & -e2;
        hm &= (low << 1) - 1; /* low == 0: all */
        lf &= hm;
        cr &= hm;
        fs->e2 = e2;
        fs->e2_base = base;
        __u64 ht = swar_eq(w, '\t') & hm;
        bad |= (swar_lt(w, 0x20) | swar_eq(w, 0x7f)) & hm & ~(cr | lf | ht);
        bad |= lf ^ (((cr << 8) | (carry_cr >> 56)) & hm); /* CR iff LF follows */
        /* Record the word's LFs: at most three when it is not refused (every CR LF
         * but the empty line's ends a line of at least one byte, so LFs are three or
         * more bytes apart, the empty line's two). Slots past the count are scratch. */
        __u64 l1 = lf & -lf, rest = lf ^ l1, l2 = rest & -rest, l3 = rest ^ l2;
        fs->lf[nl & (HEAD_LINES_MAX * 2 - 1)] = base + swar_index(l1);
        fs->lf[(nl + 1) & (HEAD_LINES_MAX * 2 - 1)] = base + swar_index(l2);
        fs->lf[(nl + 2) & (HEAD_LINES_MAX * 2 - 1)] = base + swar_index(l3);
        nl += swar_count(lf);
        carry_cr = cr;
        carry_lf = lf;
        if (e2 | opaque((r - 9) >> 63)) /* the empty line, or no next word */
            break;
    }
    fs->bad = bad;
    fs->nl = nl;
    nl = READ_BACK(fs->nl);
    __u64 e2 = READ_BACK(fs->e2);
    if (!e2 || READ_BACK(fs->bad) || nl < 2 || nl > HEAD_LINES_MAX)
        return 0;
    /* the head ends after the empty line's LF */
    fs->end = READ_BACK(fs->e2_base) + swar_index(e2 & -e2) + 1;
    __u32 end;

    /* Pass 2: header lines 1 .. nl-2 (line nl-1 is the empty one). A line whose first
     * letter starts none of the names wanted (a response wants Content-Length and
     * Transfer-Encoding only) is passed over before the name compares: most of a
     * response's lines (Server, Date, ETag, ...). */
    fs->seen = 0;
    fs->first = READ_BACK(fs->a_response) ? FIRST_LETTERS_RESPONSE : FIRST_LETTERS_REQUEST;
#pragma clang loop unroll(disable)
    for (__u32 l = 1; l < HEAD_LINES_MAX - 1; l++) {
        if (l + 1 >= READ_BACK(fs->nl))
            break;
        __u32 s = fs->lf[(l - 1) & (HEAD_LINES_MAX - 1)] + 1;
        __u32 e = fs->lf[l & (HEAD_LINES_MAX - 1)] - 1; /* the CR */
        __u64 w0 = head_word(fs, s);
        __u8 c0 = w0;
        if (c0 == ' ' || c0 == '\t')
            return 0; /* obs-fold: a continuation line */
        __u32 lc = c0 | 0x20;
        if (!((READ_BACK(fs->first) >> (lc & 63)) & 1))
            continue;
        __u64 w1 = head_word(fs, s + 8), w2 = head_word(fs, s + 16);
        /* only the names that start with the line's first letter: at most one
         * matches, giving id + 1 and the name's length, or 0 and 0 (a byte that
         * merely shares the letter's bit above fails the whole-name compare) */
        __u64 id1;
        __u32 n;
        if (lc == 'c') {
            __u64 m_cl = NAME_IS(w0, w1, w2, "content-length:");
            id1 = m_cl * (H_CONTENT_LENGTH + 1);
            n = m_cl * 15;
        } else if (lc == 't') {
            __u64 m_te = NAME_IS(w0, w1, w2, "transfer-encoding:");
            __u64 m_tp = NAME_IS(w0, w1, w2, "traceparent:");
            __u64 m_ts = NAME_IS(w0, w1, w2, "tracestate:");
            id1 = m_te * (H_TRANSFER_ENCODING + 1) + m_tp * (H_TRACEPARENT + 1) +
                  m_ts * (H_TRACESTATE + 1);
            n = m_te * 18 + m_tp * 12 + m_ts * 11;
        } else if (lc == 'h') {
            __u64 m_host = NAME_IS(w0, w1, w2, "host:");
            id1 = m_host * (H_HOST + 1);
            n = m_host * 5;
        } else {
            __u64 m_ua = NAME_IS(w0, w1, w2, "user-agent:");
            id1 = m_ua * (H_USER_AGENT + 1);
            n = m_ua * 11;
        }
        if (!id1)
            continue;
        int id = (id1 - 1) & 7;
        __u32 bit = 1U << id;
        /* a response's Host & co. are none of our business (nor are duplicates) */
        if (READ_BACK(fs->a_response) && id < H_CONTENT_LENGTH)
            continue;
        if (fs->seen & bit)
            return 0; /* a second one: which one counts is the chunk stream's call */
        fs->seen |= bit;
        fs->vo[id & 7] = s + n;
        fs->ve[id & 7] = e;
    }

    fs->cl = 0;
    if (READ_BACK(fs->seen) & (1 << H_CONTENT_LENGTH)) {
        if (!head_trim(fs, H_CONTENT_LENGTH))
            return 0;
        __u32 o = fs->vo[H_CONTENT_LENGTH], e = fs->ve[H_CONTENT_LENGTH];
        if (o >= e || e - o > 18)
            return 0;
        __u64 cl = 0;
#pragma clang loop unroll(disable)
        for (int k = 0; k < 18; k++) {
            if (o + k >= e)
                break;
            __u8 c = head_byte(fs, o + k);
            if (c < '0' || c > '9')
                return 0;
            cl = cl * 10 + (c - '0');
        }
        fs->cl = cl;
    }

    end = READ_BACK(fs->end);
    __u32 lf0 = fs->lf[0];
    __u64 w0 = head_word(fs, 0);
    if (READ_BACK(fs->a_response)) {
        /* "HTTP/1.x DDD " */
        __u64 w1 = head_word(fs, 8);
        __u8 minor = (w0 >> 56) - '0';
        __u8 d0 = ((w1 >> 8) & 0xff) - '0', d1 = ((w1 >> 16) & 0xff) - '0',
             d2 = ((w1 >> 24) & 0xff) - '0';
        if (lf0 < 14 || (w0 & 0x00ffffffffffffffULL) != P8('H', 'T', 'T', 'P', '/', '1', '.', 0) ||
            minor > 1 || (w1 & 0xff) != ' ' || ((w1 >> 32) & 0xff) != ' ' || d0 > 9 ||
            d1 > 9 || d2 > 9)
            return 0;
        fs->minor = minor;
        fs->status = d0 * 100 + d1 * 10 + d2;
        return end;
    }

    /* "METHOD SP target SP HTTP/1.x": exactly two spaces and no tab on the line */
    if (lf0 < 13)
        return 0;
    line0_count(fs, lf0);
    if (READ_BACK(fs->sp0) != 2 || READ_BACK(fs->ht0) != 0)
        return 0;
    /* the method: 1..15 upper-case letters up to the first space */
    __u64 w1 = head_word(fs, 8);
    __u64 up0 = swar_lt(w0, 'Z' + 1) & ~swar_lt(w0, 'A');
    __u64 up1 = swar_lt(w1, 'Z' + 1) & ~swar_lt(w1, 'A');
    __u64 s0 = swar_eq(w0, ' '), s1 = swar_eq(w1, ' ');
    __u32 m;
    if (s0) {
        __u64 low = s0 & -s0;
        m = swar_index(low);
        if ((low - 1) & HIGHS8 & ~up0)
            return 0;
    } else if (s1) {
        __u64 low = s1 & -s1;
        m = 8 + swar_index(low);
        if ((HIGHS8 & ~up0) || ((low - 1) & HIGHS8 & ~up1))
            return 0;
    } else {
        return 0;
    }
    fs->m = m;
    m = READ_BACK(fs->m);
    if (m == 0)
        return 0;
    if (m == 7 && (w0 & 0x00ffffffffffffffULL) == P8('C', 'O', 'N', 'N', 'E', 'C', 'T', 0))
        return 0; /* a tunnel: what follows is not HTTP */
    __u64 v = head_word(fs, lf0 - 9);
    __u8 minor = (v >> 56) - '0';
    if ((v & 0x00ffffffffffffffULL) != P8('H', 'T', 'T', 'P', '/', '1', '.', 0) ||
        minor > 1 || head_byte(fs, lf0 - 10) != ' ' || lf0 - 10 <= m + 1)
        return 0;
    fs->minor = minor;
    fs->p.method_len = m;
    fs->p.target_off = m + 1;
    fs->p.target_len = lf0 - 10 - (m + 1);
    fs->p.is_head = m == 4 && (__u32)w0 == P8('H', 'E', 'A', 'D', 0, 0, 0, 0);
#pragma unroll
    for (int id = 0; id < 4; id++) {
        __u16 off = 0, hlen = 0;
        if (fs->seen & (1U << id)) {
            if (!head_trim(fs, id))
                return 0;
            off = fs->vo[id];
            hlen = fs->ve[id] - off;
        }
        fs->p.hv_off[id] = off;
        fs->p.hv_len[id] = hlen;
    }
    return end;
}

/* ---- emission ------------------------------------------------------------------- */

/* The EVENT_EXCHANGE record: header + the request head, one ring-buffer output. */
static __always_inline void fast_emit(struct conn_key_t *key, struct conn_t *conn,
                                      struct pending_t *p, __u64 now)
{
    __u32 zero = 0;
    struct exchange_event *ev = xscratch.lookup(&zero);
    if (!ev)
        return;
    ev->hdr.kind = EVENT_EXCHANGE;
    ev->hdr.role = conn->role;
    ev->hdr.source = conn->fast_src;
    ev->hdr.version_minor = p->version_minor;
    ev->hdr.tgid = key->tgid;
    ev->hdr.tid = p->tid;
    ev->hdr.fd = key->fd;
    ev->hdr.generation = conn->generation;
    ev->hdr.start_ns = p->start_ns;
    ev->hdr.end_ns = now;
    ev->hdr.request_body_size = p->req_body;
    ev->hdr.response_body_size = p->resp_body;
    ev->hdr.status = p->status;
    conn_addrs(conn, &ev->hdr.family, &ev->hdr.local_port, &ev->hdr.remote_port,
               ev->hdr.local_addr, ev->hdr.remote_addr);
    bpf_get_current_comm(&ev->hdr.comm, sizeof(ev->hdr.comm));
    ev->hdr.method_len = p->method_len;
    ev->hdr.target_off = p->target_off;
    ev->hdr.target_len = p->target_len;
    ev->hdr.host_off = p->hv_off[H_HOST];
    ev->hdr.host_len = p->hv_len[H_HOST];
    ev->hdr.user_agent_off = p->hv_off[H_USER_AGENT];
    ev->hdr.user_agent_len = p->hv_len[H_USER_AGENT];
    ev->hdr.traceparent_off = p->hv_off[H_TRACEPARENT];
    ev->hdr.traceparent_len = p->hv_len[H_TRACEPARENT];
    ev->hdr.tracestate_off = p->hv_off[H_TRACESTATE];
    ev->hdr.tracestate_len = p->hv_len[H_TRACESTATE];
    __u32 hl = *(volatile __u16 *)&p->head_len;
    hl &= (REQ_HEAD_MAX << 1) - 1;
    if (hl > REQ_HEAD_MAX)
        hl = REQ_HEAD_MAX;
    ev->hdr.head_len = hl;
    if (bpf_probe_read_kernel(ev->head, hl, p->req) != 0)
        return;
    __u64 total = sizeof(struct exchange_event_hdr) + hl;
    if (total > sizeof(struct exchange_event))
        return;
    if (events.ringbuf_output(ev, total, rb_flags()) != 0)
        counter_add(CNT_RINGBUF_FULL, 1);
    else
        counter_add(CNT_FAST_EXCHANGES, 1);
}

/* Hand the connection over to the chunk stream for good (see the file comment):
 * CONN_OPEN with stream_start, then the in-flight exchange replayed as DATA records.
 * `source` is the stream the fast state served. */
static __always_inline void fast_fallback(struct conn_key_t *key, struct conn_t *conn,
                                          __u32 tid, __u8 source, __u32 reason)
{
    counter_add(CNT_FAST_FALLBACKS, 1);
    counter_add(reason, 1);
    __u8 f = conn->fast;
    conn->fast = FAST_OFF;
    __u8 rq = conn->role == ROLE_SERVER ? DIR_INGRESS : DIR_EGRESS;
    __u8 rs = rq ^ 1;
    __u64 at_rq, at_rs;
    if (source == SOURCE_OPENSSL) {
        at_rq = conn->tls_pos[rq & 1];
        at_rs = conn->tls_pos[rs & 1];
        conn->tls_proto = PROTO_HTTP1; /* for the CONN_OPEN below */
    } else {
        at_rq = conn->pos[rq & 1];
        at_rs = conn->pos[rs & 1];
        conn->proto = PROTO_HTTP1; /* the chunk stream must not re-infer a body chunk */
    }
    struct pending_t *p = 0;
    if (f == FAST_REQ || f == FAST_RESP) {
        p = pending.lookup(key);
        if (p && p->generation != conn->generation)
            p = 0;
    }
    __u64 start_rq = p ? p->req_pos : at_rq;
    __u64 start_rs = p && p->resp_cap ? p->resp_pos : at_rs;
    if (rq == DIR_INGRESS)
        conn_ensure_open_at(key, conn, tid, source, start_rq, start_rs);
    else
        conn_ensure_open_at(key, conn, tid, source, start_rs, start_rq);
    if (!p)
        return;
    emit_data_at(key->tgid, p->tid, key->fd, conn->generation, conn->role, rq, source,
                 p->req, p->req_cap, at_rq - p->req_pos, p->req_pos, p->start_ns);
    if (p->resp_cap)
        emit_data_at(key->tgid, tid, key->fd, conn->generation, conn->role, rs, source,
                     p->resp, p->resp_cap, at_rs - p->resp_pos, p->resp_pos, conn->fast_ts);
    pending.delete(key);
}

/* What the caller does with a chunk after fast_chunk(): */
#define FP_DONE 0  /* consumed by the fast path (positions advanced): nothing more */
#define FP_TODAY 1 /* not the fast path's: the chunk stream as before, state untouched */
#define FP_FELL 2  /* handed over just now: the chunk stream, and the stream is HTTP */

/* One chunk of a connection: `size` bytes moved in direction `dir`, of which the first
 * `cap` are readable at `ubuf` (the whole buffer, or the first iovec segment; NULL for
 * sendfile). Heads must lie within those `cap` bytes. */
static __always_inline int fast_chunk(struct conn_key_t *key, struct conn_t *conn, __u32 tid,
                                      __u8 dir, __u8 source, const void *ubuf, __u64 cap,
                                      __u64 size)
{
    __u8 f = conn->fast;
    if (f == FAST_OFF || (f != FAST_IDLE && conn->fast_src != source))
        return FP_TODAY;
    __u8 d = dir & 1;
    __u8 rq = conn->role == ROLE_SERVER ? DIR_INGRESS : DIR_EGRESS;
    __u64 pos = source == SOURCE_OPENSSL ? conn->tls_pos[d] : conn->pos[d];
    __u64 now = bpf_ktime_get_ns();
    __u32 reason = CNT_FB_OTHER;

    if (f == FAST_REQ && d == rq) { /* request body */
        if (size > conn->fast_left) {
            reason = CNT_FB_OVERRUN;
            goto fall;
        }
        conn->fast_left -= size;
        goto consumed;
    }
    if (f == FAST_RESP) { /* response body */
        if (d == rq) {
            reason = CNT_FB_ORDER; /* pipelining: the next request before this response ended */
            goto fall;
        }
        if (size > conn->fast_left) {
            reason = CNT_FB_OVERRUN;
            goto fall;
        }
        conn->fast_left -= size;
        conn->fast_ts = now;
        goto consumed;
    }

    /* A head is expected: FAST_IDLE (request) or FAST_REQ in the response direction. */
    if (!ubuf || !cap)
        goto fall; /* sendfile where a head must be */
    __u32 zero = 0;
    struct fast_scratch_t *fs = fast_scratch.lookup(&zero);
    if (!fs)
        goto fall;
    fs->a_size = size;
    fs->a_cap = cap;
    fs->a_pos = pos;
    fs->a_now = now;
    fs->a_tid = tid;
    fs->a_response = d != rq;
    {
        /* the head window in one read; the inference below looks at its first bytes */
        __u64 c = READ_BACK(fs->a_cap);
        __u32 lim = READ_BACK(fs->a_response) ? RESP_HEAD_MAX : REQ_HEAD_MAX;
        __u32 n = c < lim ? (__u32)c : lim;
        n &= (REQ_HEAD_MAX << 1) - 1;
        if (n > REQ_HEAD_MAX)
            n = REQ_HEAD_MAX;
        if (bpf_probe_read_user(fs->p.req, n, ubuf) != 0) {
            counter_add(CNT_READ_FAULT, 1);
            goto fall;
        }
        fs->p.req_cap = n;
    }
    {
        __u32 n8 = READ_BACK(fs->p.req_cap);
        n8 = n8 < 8 ? n8 : 8;
        /* Not a start the inference knows. On a stream already known to be HTTP/1.x it
         * still is one (an unknown method longer than the inference's 8 bytes, such as
         * PROPFIND): head_parse decides, and falls back when it cannot. Elsewhere the
         * chunk stream's inference has its say (a TLS handshake, the HTTP/2 preface). */
        if (infer_http(head_word(fs, 0), n8) == INFER_NO &&
            (source == SOURCE_OPENSSL ? conn->tls_proto : conn->proto) != PROTO_HTTP1)
            return FP_TODAY;
    }
    if (d != rq && (f == FAST_IDLE || conn->fast_left)) {
        reason = CNT_FB_ORDER; /* response without request, or before the request's end */
        goto fall;
    }
    __u32 hl = head_parse(fs);
    size = READ_BACK(fs->a_size);
    pos = READ_BACK(fs->a_pos);
    now = READ_BACK(fs->a_now);
    tid = READ_BACK(fs->a_tid);
    int response = READ_BACK(fs->a_response);
    __u32 n = READ_BACK(fs->p.req_cap);
    reason = response ? CNT_FB_RESPONSE : CNT_FB_REQUEST;
    if (!hl || (fs->seen & (1 << H_TRANSFER_ENCODING)))
        goto fall;

    if (!response) {
        __u64 body = fs->cl;
        if (size > hl + body) {
            reason = CNT_FB_OVERRUN; /* bytes of a next request in the same write */
            goto fall;
        }
        fs->p.generation = conn->generation;
        fs->p.start_ns = now;
        fs->p.req_pos = pos;
        fs->p.resp_pos = 0;
        fs->p.req_body = body;
        fs->p.resp_body = 0;
        fs->p.tid = tid;
        fs->p.resp_cap = 0;
        fs->p.head_len = hl;
        fs->p.status = 0;
        fs->p.version_minor = fs->minor;
        fs->p.role = conn->role;
        fs->p.source = source;
        if (pending.update(key, &fs->p) != 0) {
            reason = CNT_PENDING_FULL;
            goto fall;
        }
        conn->fast = FAST_REQ;
        conn->fast_src = source;
        conn->fast_left = hl + body - size;
        /* the stream is HTTP/1.x now: a later head the inference cannot name is still
         * one (see the gate above) */
        if (source == SOURCE_OPENSSL)
            conn->tls_proto = PROTO_HTTP1;
        else
            conn->proto = PROTO_HTTP1;
        goto consumed;
    }

    struct pending_t *p = pending.lookup(key);
    if (!p || p->generation != conn->generation) {
        reason = CNT_FB_OTHER;
        goto fall;
    }
    __u16 status = fs->status;
    __u64 body = fs->cl;
    if (status < 200)
        goto fall; /* 1xx (101 included): more responses or another protocol follow */
    if (p->is_head || status == 204 || status == 304)
        body = 0;
    else if (!(fs->seen & (1 << H_CONTENT_LENGTH)))
        goto fall; /* delimited by the close */
    if (size > hl + body) {
        reason = CNT_FB_OVERRUN;
        goto fall;
    }
    p->resp_body = body;
    p->status = status;
    if (size == hl + body) {
        /* The whole response in this chunk (nginx's writev of head and body): emit
         * now. The response head is kept in p->resp only for a later hand-over, and
         * after this record there is none. */
        if (source == SOURCE_OPENSSL)
            conn->tls_pos[d] = pos + size;
        else
            conn->pos[d] = pos + size;
        fast_emit(key, conn, p, now);
        pending.delete(key);
        conn->fast = FAST_IDLE;
        conn->fast_left = 0;
        return FP_DONE;
    }
    __u32 rn = n & ((RESP_HEAD_MAX << 1) - 1);
    if (rn > RESP_HEAD_MAX)
        rn = RESP_HEAD_MAX;
    if (bpf_probe_read_kernel(p->resp, rn, fs->p.req) != 0)
        goto fall;
    p->resp_cap = rn;
    p->resp_pos = pos;
    conn->fast = FAST_RESP;
    conn->fast_left = hl + body - size;
    conn->fast_ts = now;

consumed:
    if (source == SOURCE_OPENSSL)
        conn->tls_pos[d] = pos + size;
    else
        conn->pos[d] = pos + size;
    if (conn->fast == FAST_RESP && conn->fast_left == 0) {
        struct pending_t *done = pending.lookup(key);
        if (done && done->generation == conn->generation)
            fast_emit(key, conn, done, now);
        pending.delete(key);
        conn->fast = FAST_IDLE;
    }
    return FP_DONE;

fall:
    fast_fallback(key, conn, tid, source, reason);
    return FP_FELL;
}

#endif /* OTEL_EBPF_HTTP1_FAST_H */
