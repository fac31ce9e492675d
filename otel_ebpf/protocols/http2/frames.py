"""HTTP/2 framing of one direction of one connection (RFC 9113 section 4).

In: the direction's captured bytes in stream order (`feed`) and the bytes that were
moved but not captured (`gap`). Out: calls on the session (session.py), one per event
it needs: a complete header block, DATA payload pieces and frame ends, RST_STREAM,
GOAWAY, SETTINGS, loss of synchronisation.

States (plain ints on the hot path):
- PREFACE: the client connection preface (24 bytes) is being matched.
- HEADER: a 9-byte frame header is due (split headers are buffered in `hbuf`).
- DATA_PADLEN: a PADDED DATA frame's pad-length byte is due.
- DATA_BODY: DATA payload bytes (`remaining` to go), passed through, never buffered.
- BUFFER: a payload the session needs (header block fragment, RST_STREAM, GOAWAY,
  SETTINGS) is being buffered; only `keep` bytes of it are kept (GOAWAY debug data is
  skipped, header blocks are bounded by max_header_bytes).
- SKIP: payload bytes that are not needed (PING, WINDOW_UPDATE, padding, ...).
- RESYNC: framing was lost (a gap across a frame header, or a connection seen
  mid-stream); at the start of each captured chunk the reader checks whether the chunk
  starts with a chain of plausible frame headers and resumes there.
- DEAD: the session gave up; everything is ignored.

Gaps: inside a payload the frame boundary stays known, so the gap only costs that
payload's content: DATA sizes stay exact (counted from the frame length), a header
block loses its fields (the HPACK table is reset: its insertions are unknown), an
RST_STREAM loses its error code. A gap across a frame header (or the preface) loses
the framing: the session is told (`on_sync_lost`) and the reader resyncs; bytes
skipped or lost while resyncing are reported too (`on_unseen`): they may hold frames of
open streams.

Frame headers from the kernel: for a chunk moved in one call whose uncaptured part
holds frame headers, the kernel hands over those headers with their positions (its
frame walk, bpf/http2_walk.h). A gap whose headers are all known is no loss: the
reader frames it as if captured, without payload bytes (DATA sizes and END_STREAM
exact; a header block in it is lost as above and counted). A header is used only at
the position where this reader's own framing expects one; the first header missing
there is a gap across a header, as before.

Header blocks: HEADERS or PUSH_PROMISE plus CONTINUATION frames until END_HEADERS are
joined (padding and priority fields removed); a block is delivered whole, with the
timestamp of the chunk that carried its first byte and of the chunk that ended it.
"""

from __future__ import annotations

from struct import Struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otel_ebpf.protocols.http2.hpack_decoder import HeaderBlockDecoder
    from otel_ebpf.protocols.http2.session import Http2Session

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_PREFACE_LEN = len(PREFACE)

# Frame types (RFC 9113 6).
(DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE,
 CONTINUATION) = range(10)
# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

DEFAULT_MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE's initial value
ANY_FRAME = (1 << 24) - 1  # the largest length a frame header can carry

PREFACE_STATE, HEADER, DATA_PADLEN, DATA_BODY, BUFFER, SKIP, RESYNC, DEAD = range(8)

_FRAME_HEADER = Struct(">BHBBL")  # length (3 bytes, as 1 + 2), type, flags, stream id
_unpack_header = _FRAME_HEADER.unpack_from

# Flags each frame type may carry (RFC 9113 6.x); used to judge resync candidates.
_ALLOWED_FLAGS = (
    END_STREAM | PADDED,  # DATA
    END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,  # HEADERS
    0,  # PRIORITY
    0,  # RST_STREAM
    ACK,  # SETTINGS
    END_HEADERS | PADDED,  # PUSH_PROMISE
    ACK,  # PING
    0,  # GOAWAY
    0,  # WINDOW_UPDATE
    END_HEADERS,  # CONTINUATION
)


def plausible_frame(length: int, ftype: int, flags: int, sid: int, max_frame: int) -> bool:
    """Could these 9 bytes be a frame header? Strict: used only to resynchronise."""
    if ftype > CONTINUATION or length > max_frame or flags & ~_ALLOWED_FLAGS[ftype]:
        return False
    if ftype in (SETTINGS, PING, GOAWAY):
        if sid:
            return False
        if ftype == SETTINGS:
            return length % 6 == 0 and not (flags & ACK and length)
        return length == 8 if ftype == PING else length >= 8
    if ftype == WINDOW_UPDATE:
        return length == 4
    if not sid:
        return False
    if ftype == PRIORITY:
        return length == 5
    if ftype == RST_STREAM:
        return length == 4
    return True


def plausible_chunk(data: bytes, max_frame: int) -> bool:
    """Does `data` start with a frame header, and does every frame header it holds
    (following the lengths) look valid? A CONTINUATION cannot start a resync (its block's
    start is lost)."""
    n = len(data)
    off = 0
    while off + 9 <= n:
        hi, lo, ftype, flags, sid = _unpack_header(data, off)
        length = hi << 16 | lo
        if not plausible_frame(length, ftype, flags, sid & 0x7FFFFFFF, max_frame):
            return False
        if off == 0 and ftype == CONTINUATION:
            return False
        off += 9 + length
    return off > 0


class FrameReader:
    """Frames one direction; see the module docstring."""

    __slots__ = (
        "session",
        "direction",
        "hpack",
        "state",
        "requests",
        "started",
        "hbuf",
        "hdr_ts",
        "hdr_tid",
        "ftype",
        "flags",
        "sid",
        "remaining",
        "pad",
        "payload",
        "keep",
        "payload_lost",
        "frame_ts",
        "frame_tid",
        "preface_pos",
        "block",
        "block_sid",
        "block_type",
        "block_flags",
        "block_ts",
        "block_tid",
        "block_lost",
        "in_block",
        "max_frame",
        "limit_frames",
        "max_header",
        "max_resync",
        "skipped",
        "synced",
    )

    def __init__(
        self,
        session: Http2Session,
        direction: int,
        hpack: HeaderBlockDecoder,
        *,
        expect_preface: bool,
        strict: bool,
        max_header: int,
        max_resync: int,
    ) -> None:
        self.session = session
        self.direction = direction
        self.hpack = hpack
        # PREFACE when this direction is known to be the client's from its first byte,
        # HEADER for the server's, RESYNC when seen mid-stream (or role unknown).
        if not strict:
            self.state = RESYNC
        else:
            self.state = PREFACE_STATE if expect_preface else HEADER
        self.requests: bool | None = None  # does this direction carry requests? (session)
        self.started = False  # any byte or gap seen
        self.hbuf = b""  # a frame header split across chunks
        self.hdr_ts = 0
        self.hdr_tid = 0
        self.ftype = 0
        self.flags = 0
        self.sid = 0
        self.remaining = 0  # payload bytes of the current frame still to come
        self.pad = 0  # padding bytes at the end of the current DATA frame
        self.payload: bytes | bytearray = b""
        self.keep = 0
        self.payload_lost = False
        self.frame_ts = 0
        self.frame_tid = 0
        self.preface_pos = 0
        self.block: bytes | bytearray | None = None  # header block being joined
        self.block_sid = 0
        self.block_type = 0
        self.block_flags = 0
        self.block_ts = 0
        self.block_tid = 0
        self.block_lost = False
        self.in_block = False  # a HEADERS/PUSH_PROMISE without END_HEADERS was seen
        # Largest frame the peer may send: raised by the receiver's SETTINGS. Checked on
        # in-sync frames only when every SETTINGS was seen (strict; not after an h2c
        # upgrade, whose first settings travel in the HTTP2-Settings request header).
        self.max_frame = DEFAULT_MAX_FRAME
        self.limit_frames = strict
        self.max_header = max_header
        self.max_resync = max_resync
        self.skipped = 0  # bytes skipped in the current resync
        # Frames were read in this direction: it is HTTP/2, so however long a resync
        # takes (a large transfer written in partial writes) the session is kept.
        self.synced = strict

    def buffered(self) -> int:
        size = len(self.hbuf) + len(self.payload)
        if self.block is not None:
            size += len(self.block)
        return size

    def stop(self) -> None:
        self.state = DEAD
        self.hbuf = b""
        self.payload = b""
        self.block = None

    # -- input ---------------------------------------------------------------------------

    def feed(self, data: bytes, ts: int, tid: int) -> None:
        n = len(data)
        pos = 0
        first = not self.started
        if first:
            self.started = True
            if self.state == RESYNC and PREFACE.startswith(data[:_PREFACE_LEN]):
                self.state = PREFACE_STATE  # a new connection after all (role unknown)
        state = self.state
        if state == RESYNC:
            if not plausible_chunk(data, self.max_frame):
                self._skip(n, ts)
                return
            self.skipped = 0
            self.synced = True
            if not first:  # (a mid-stream connection's first chunk is not a recovery)
                self.session.on_resynced(self)
            state = self.state = HEADER
        while pos < n:
            if state == HEADER:
                hbuf = self.hbuf
                if not hbuf and n - pos >= 9:
                    hi, lo, ftype, flags, sid = _unpack_header(data, pos)
                    pos += 9
                    self.frame_ts = ts
                    self.frame_tid = tid
                    length = hi << 16 | lo
                    if (ftype <= HEADERS and pos + length <= n and not flags & PADDED
                            and not self.in_block and sid & 0x7FFFFFFF
                            and (length <= self.max_frame or not self.limit_frames)):
                        # The whole frame is in this chunk (most are): handled here as
                        # _frame and the states after it would, without going through them.
                        pos = self._whole_frame(data, pos, length, ftype, flags,
                                                sid & 0x7FFFFFFF, ts, tid)
                        state = self.state
                        continue
                else:
                    if not hbuf:
                        self.hdr_ts = ts
                        self.hdr_tid = tid
                    take = min(n, pos + 9 - len(hbuf))
                    hbuf += data[pos:take]
                    pos = take
                    if len(hbuf) < 9:
                        self.hbuf = hbuf
                        return
                    self.hbuf = b""
                    hi, lo, ftype, flags, sid = _unpack_header(hbuf, 0)
                    self.frame_ts = self.hdr_ts
                    self.frame_tid = self.hdr_tid
                self._frame(hi << 16 | lo, ftype, flags, sid & 0x7FFFFFFF, ts)
                state = self.state
            elif state == DATA_BODY:
                remaining = self.remaining
                take = n - pos if n - pos < remaining else remaining
                self.session.on_data(self, self.sid, data, pos, pos + take)
                pos += take
                remaining -= take
                self.remaining = remaining
                if not remaining:
                    self._data_body_done(ts)
                    state = self.state
            elif state == BUFFER:
                remaining = self.remaining
                take = n - pos if n - pos < remaining else remaining
                payload = self.payload
                want = self.keep - len(payload)
                if want > 0:
                    if not payload and take >= want:
                        self.payload = data[pos : pos + want]  # whole in this chunk: no copy loop
                    else:
                        if not payload:
                            payload = self.payload = bytearray()
                        end = pos + (take if take < want else want)
                        payload += data[pos:end]  # type: ignore[operator]
                        if not self.session.check_buffer(self):
                            return
                pos += take
                self.remaining = remaining - take
                if remaining == take:
                    self._frame_done(ts)
                    state = self.state
            elif state == SKIP:
                remaining = self.remaining
                take = n - pos if n - pos < remaining else remaining
                pos += take
                self.remaining = remaining - take
                if remaining == take:
                    self._frame_done(ts)
                    state = self.state
            elif state == DATA_PADLEN:
                pad = data[pos]
                pos += 1
                self.remaining -= 1
                if pad > self.remaining:
                    self.lose(ts, "bad_padding")
                    state = self.state
                    continue
                self.pad = pad
                self.remaining -= pad
                self._data_body_started(ts)
                state = self.state
            elif state == PREFACE_STATE:
                p = self.preface_pos
                take = min(n, pos + _PREFACE_LEN - p)
                if data[pos:take] != PREFACE[p : p + take - pos]:
                    self.session.not_http2(self)
                    return
                p += take - pos
                pos = take
                if p == _PREFACE_LEN:
                    self.preface_pos = 0
                    self.state = HEADER
                    self.session.on_preface(self)
                    state = self.state  # (DEAD if the session gave up)
                else:
                    self.preface_pos = p
            else:  # DEAD, or RESYNC entered while handling this chunk: wait for the next
                if state == RESYNC:
                    self._skip(n - pos, ts)
                return

    def gap(self, size: int, ts: int, frames: dict[int, bytes] | None = None) -> None:
        """`size` bytes of this direction were not captured. `frames`: the frame
        headers the kernel read in them (bpf/http2_walk.h), 9 bytes each, keyed by
        their start's distance before the gap's end (negative; a header whose first
        bytes were captured starts before the gap; one the gap ends in has only the
        bytes up to there). The framing is kept across the gap
        while a header is known wherever one is due; the first one missing is a loss."""
        if not frames:
            self._gap(size, ts)
            return
        self.started = True
        at = 0  # bytes of the gap accounted for
        while at < size:
            state = self.state
            if state == HEADER:
                hbuf = self.hbuf
                have = len(hbuf)
                header = frames.get(at - have - size)
                # (a header the chunk ends in has only the bytes up to the gap's end)
                if (header is None or header[:have] != hbuf
                        or len(header) < min(9, have + size - at)):
                    self._gap(size - at, ts)  # a loss
                    return
                self.session.count("http2.kernel_frame_headers")
                if size - at < 9 - have:  # the header goes on in the next chunk
                    if not have:
                        self.hdr_ts = ts
                        self.hdr_tid = self.frame_tid
                    self.hbuf = header[: have + size - at]
                    return
                at += 9 - have
                if have:
                    self.frame_ts = self.hdr_ts
                    self.frame_tid = self.hdr_tid
                else:
                    self.frame_ts = ts
                self.hbuf = b""
                hi, lo, ftype, flags, sid = _unpack_header(header, 0)
                self._frame(hi << 16 | lo, ftype, flags, sid & 0x7FFFFFFF, ts)
            elif state == DATA_BODY or state == BUFFER or state == SKIP or state == DATA_PADLEN:
                # up to the current frame's end (payload, then a DATA frame's padding)
                to_end = self.remaining + (self.pad if state == DATA_BODY else 0)
                take = size - at if size - at < to_end else to_end
                if take <= 0:  # (no such state has an empty rest; never loop on one)
                    self._gap(size - at, ts)
                    return
                self._gap(take, ts)
                at += take
            else:  # PREFACE_STATE, RESYNC, DEAD
                self._gap(size - at, ts)
                return

    def _gap(self, size: int, ts: int) -> None:
        """`size` bytes not captured, no frame header known in them."""
        self.started = True
        state = self.state
        if state == DEAD or not size:
            return
        if state == RESYNC:  # still looking for a frame start; these bytes are unseen too
            self.session.on_unseen(self, ts, "gap_in_frames")
            return
        remaining = self.remaining
        if state == DATA_BODY:
            # Inside a DATA payload (data, then `pad` bytes of padding): exact sizes.
            pad = self.pad
            if size > remaining + pad:
                self.lose(ts, "gap_in_frames")  # a frame header was among the lost bytes
                return
            data_part = size if size < remaining else remaining
            self.session.on_data_gap(self, self.sid, data_part)
            self.remaining = remaining - data_part
            if data_part == remaining:
                self.pad = 0
                self.remaining = pad - (size - data_part)
                self.state = SKIP
                if not self.remaining:
                    self._frame_done(ts)
            return
        if state == HEADER or state == PREFACE_STATE or size > remaining:
            self.lose(ts, "gap_in_frames")  # a frame header was among the lost bytes
            return
        # Inside the current frame's payload: its boundary is still known.
        self.remaining = remaining - size
        if state == DATA_PADLEN:
            # The pad length is unknown: the split between data and padding is too.
            self.session.on_data_uncertain(self, self.sid)
            self.state = SKIP
        elif state == BUFFER:
            self._payload_lost()
            self.state = SKIP
        # SKIP (padding or an unneeded payload): nothing lost.
        if remaining == size:
            self._frame_done(ts)

    # -- frames -----------------------------------------------------------------------------

    def _whole_frame(self, data: bytes, pos: int, length: int, ftype: int, flags: int,
                     sid: int, ts: int, tid: int) -> int:
        """An unpadded DATA or HEADERS frame on a stream, outside a header block, whose
        payload is all in this chunk from `pos` on (checked by feed): the same calls and
        end state as _frame and the DATA_BODY / BUFFER states give it. -> position after."""
        self.ftype = ftype
        self.flags = flags
        self.sid = sid
        self.remaining = 0
        self.payload_lost = False
        session = self.session
        end = pos + length
        if ftype == DATA:
            self.pad = 0
            if length:
                session.on_data(self, sid, data, pos, end)
            self.state = HEADER
            session.on_data_end(self, sid, flags & END_STREAM, ts)
            return end
        if (not flags & END_HEADERS or flags & PRIORITY_FLAG or length > self.max_header):
            # a header block that goes on in CONTINUATION frames, a priority field, or
            # a block too large: the general path
            self._frame(length, ftype, flags, sid, ts)
            return pos
        self.block = None
        self.block_sid = sid
        self.block_type = HEADERS
        self.block_flags = flags
        self.block_ts = ts
        self.block_tid = tid
        self.block_lost = False
        self.state = HEADER
        session.on_header_block(self, sid, HEADERS, flags & END_STREAM, data[pos:end], ts,
                                tid, ts)
        return end

    def _frame(self, length: int, ftype: int, flags: int, sid: int, ts: int) -> None:
        """A frame header was read (frame_ts/frame_tid: the chunk of its first byte)."""
        if self.in_block and (ftype != CONTINUATION or sid != self.block_sid):
            self.lose(ts, "continuation_expected")
            return
        if self.limit_frames and length > self.max_frame:
            self.lose(ts, "frame_too_large")
            return
        self.ftype = ftype
        self.flags = flags
        self.sid = sid
        self.remaining = length
        self.payload_lost = False
        if ftype == DATA:
            if not sid:
                self.lose(ts, "data_on_stream_0")
                return
            if flags & PADDED:
                if not length:
                    self.lose(ts, "bad_padding")
                    return
                self.state = DATA_PADLEN
            else:
                self.pad = 0
                self._data_body_started(ts)
            return
        if ftype == HEADERS or ftype == PUSH_PROMISE or ftype == CONTINUATION:
            if ftype == CONTINUATION:
                if not self.in_block:
                    self.lose(ts, "unexpected_continuation")
                    return
            else:
                if not sid:
                    self.lose(ts, "headers_on_stream_0")
                    return
                self.block = None
                self.block_sid = sid
                self.block_type = ftype
                self.block_flags = flags
                self.block_ts = self.frame_ts
                self.block_tid = self.frame_tid
                self.block_lost = False
                self.in_block = True
            block_size = len(self.block) if self.block is not None else 0
            if self.block_lost or block_size + length > self.max_header:
                if not self.block_lost:
                    self.session.count("http2.header_block_too_large")
                self._payload_lost()
                self.state = SKIP
            else:
                self.keep = length
                self.payload = b""
                self.state = BUFFER
        elif ftype == RST_STREAM or ftype == GOAWAY or ftype == SETTINGS:
            self.keep = 4 if ftype == RST_STREAM else 8 if ftype == GOAWAY else min(length, 96)
            self.payload = b""
            self.state = BUFFER
        else:  # PRIORITY, PING, WINDOW_UPDATE, extension frames: not needed
            self.state = SKIP
        if not length:
            self._frame_done(ts)

    def _data_body_started(self, ts: int) -> None:
        if self.remaining:
            self.state = DATA_BODY
        else:
            self._data_body_done(ts)

    def _data_body_done(self, ts: int) -> None:
        if self.pad:
            self.remaining = self.pad
            self.pad = 0
            self.state = SKIP
        else:
            self._frame_done(ts)

    def _payload_lost(self) -> None:
        """Bytes of a buffered payload were not captured (or a header block was too big)."""
        self.payload_lost = True
        self.payload = b""
        if self.ftype in (HEADERS, PUSH_PROMISE, CONTINUATION) and not self.block_lost:
            self.block_lost = True
            self.block = None
            self.hpack.lost_block()

    def _frame_done(self, ts: int) -> None:
        """The current frame's last payload byte was read (in the chunk stamped ts)."""
        self.state = HEADER
        ftype = self.ftype
        session = self.session
        if ftype == DATA:
            session.on_data_end(self, self.sid, self.flags & END_STREAM, ts)
        elif ftype == HEADERS or ftype == PUSH_PROMISE or ftype == CONTINUATION:
            self._fragment_done(ts)
        elif ftype == RST_STREAM:
            payload = self.payload
            code = int.from_bytes(payload, "big") if len(payload) == 4 else None
            session.on_rst_stream(self, self.sid, code, ts)
        elif ftype == GOAWAY:
            payload = self.payload
            if len(payload) == 8:
                last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                session.on_goaway(self, last, int.from_bytes(payload[4:8], "big"), ts)
            else:
                session.count("http2.goaway_lost")
        elif ftype == SETTINGS:
            if not self.flags & ACK and not self.payload_lost:
                session.on_settings(self, bytes(self.payload))
        self.payload = b""

    def _fragment_done(self, ts: int) -> None:
        flags = self.flags
        if not self.block_lost:
            payload = self.payload
            ftype = self.ftype
            start = 0
            end = len(payload)
            if ftype != CONTINUATION:
                if flags & PADDED:
                    start = 1
                    end -= payload[0] if payload else end + 1
                if ftype == HEADERS and flags & PRIORITY_FLAG:
                    start += 5
                elif ftype == PUSH_PROMISE:
                    start += 4
            if end < start:
                self.session.count("http2.malformed_frames")
                self._payload_lost()
            elif self.block is None:
                self.block = payload if start == 0 and end == len(payload) else payload[start:end]
            else:
                if not isinstance(self.block, bytearray):
                    self.block = bytearray(self.block)
                self.block += payload[start:end]
        if flags & END_HEADERS:
            block = None if self.block_lost else bytes(self.block or b"")
            self.block = None
            self.in_block = False
            self.session.on_header_block(
                self,
                self.block_sid,
                self.block_type,
                self.block_flags & END_STREAM,
                block,
                self.block_ts,
                self.block_tid,
                ts,
            )

    # -- losing and finding the framing ------------------------------------------------------

    def lose(self, ts: int, reason: str) -> None:
        """The frame boundaries are lost (gap across a header, or invalid framing)."""
        if self.state == DEAD:
            return
        self.state = RESYNC
        self.hbuf = b""
        self.payload = b""
        self.block = None
        self.in_block = False
        self.block_lost = False
        self.remaining = 0
        self.pad = 0
        self.preface_pos = 0
        self.skipped = 0
        self.hpack.lost_block()  # header blocks may have been among the lost bytes
        self.session.on_sync_lost(self, ts, reason)

    def _skip(self, count: int, ts: int) -> None:
        """Bytes passed over while resynchronising: frames of open streams may be there."""
        self.skipped += count
        self.session.count("http2.skipped_bytes", count)
        self.session.on_unseen(self, ts, "gap_in_frames")
        if self.skipped > self.max_resync and not self.synced:
            self.session.not_http2(self)
