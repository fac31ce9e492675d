"""bpf/include/events.h vs the Python decoder (otel_ebpf/capture/reader.py).

A tiny C program including the header prints sizeof/offsetof of every field; the test
compares them with the offsets implied by the reader's struct formats, and the C
constants with the Python enums. Plus decoding of hand-packed records.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import timeit
from pathlib import Path

import pytest

from otel_ebpf.capture import reader
from otel_ebpf.capture.events import (
    ConnCloseEvent,
    ConnOpenEvent,
    DataEvent,
    Direction,
    EventKind,
    Protocol,
    Role,
    Source,
)
from otel_ebpf.capture.loader import LOSS_COUNTERS, STATS_NAMES

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "bpf" / "include" / "events.h"

# Field names in the order of the reader's struct formats (padding codes skipped).
FIELDS = {
    "conn_open_event": (reader.CONN_OPEN, [
        "kind", "role", "source", "protocol", "tgid", "tid", "fd", "generation",
        "timestamp_ns", "family", "local_port", "remote_port", "local_addr", "remote_addr",
        "comm", "stream_start[0]", "stream_start[1]"]),
    "data_event_hdr": (reader.DATA_HDR, [
        "kind", "direction", "source", "role", "tgid", "tid", "fd", "generation",
        "timestamp_ns", "position", "size", "captured_len", "frame_hints"]),
    "h2_frame_hint": (reader.FRAME_HINT, ["offset", "header", "header_len"]),
    "conn_close_event": (reader.CONN_CLOSE, [
        "kind", "source", "reset", "tgid", "tid", "fd", "generation", "timestamp_ns",
        "bytes_sent", "bytes_received"]),
    "exchange_event_hdr": (reader.EXCHANGE_HDR, [
        "kind", "role", "source", "version_minor", "tgid", "tid", "fd", "generation",
        "start_ns", "end_ns", "request_body_size", "response_body_size", "status", "family",
        "local_port", "remote_port", "local_addr", "remote_addr", "comm", "head_len",
        "method_len", "target_off", "target_len", "host_off", "host_len", "user_agent_off",
        "user_agent_len", "traceparent_off", "traceparent_len", "tracestate_off",
        "tracestate_len"]),
}
# struct pending_t after its two head buffers (REQ_HEAD_MAX 1024 + RESP_HEAD_MAX 512).
PENDING_TAIL_FIELDS = [
    "generation", "start_ns", "req_pos", "resp_pos", "req_body", "resp_body", "tid", "req_cap",
    "resp_cap", "head_len", "method_len", "target_off", "target_len", "hv_off[0]", "hv_off[1]",
    "hv_off[2]", "hv_off[3]", "hv_len[0]", "hv_len[1]", "hv_len[2]", "hv_len[3]", "status",
    "version_minor", "is_head", "role", "source"]
PENDING_HEADS = 1024 + 512
CONSTANTS = {
    "EVENT_CONN_OPEN": EventKind.CONN_OPEN, "EVENT_DATA": EventKind.DATA,
    "EVENT_CONN_CLOSE": EventKind.CONN_CLOSE, "EVENT_EXCHANGE": EventKind.EXCHANGE,
    "ROLE_UNKNOWN": Role.UNKNOWN, "ROLE_SERVER": Role.SERVER, "ROLE_CLIENT": Role.CLIENT,
    "DIR_INGRESS": Direction.INGRESS, "DIR_EGRESS": Direction.EGRESS,
    "SOURCE_SYSCALL": Source.SYSCALL, "SOURCE_OPENSSL": Source.OPENSSL,
    "PROTO_UNKNOWN": Protocol.UNKNOWN, "PROTO_HTTP1": Protocol.HTTP1,
    "PROTO_NOT_HTTP": Protocol.NOT_HTTP, "PROTO_HTTP2": Protocol.HTTP2,
    "MAX_CAPTURE_BYTES": 4096, "CNT_MAX": len(LOSS_COUNTERS),
}


def python_offsets(st: struct.Struct, names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) from a '<'-format with explicit 'x' padding."""
    out = {}
    offset = 0
    names_iter = iter(names)
    for count, code in __import__("re").findall(r"(\d*)([a-zA-Z?])", st.format[1:]):
        n = int(count) if count else 1
        if code == "x":
            offset += n
            continue
        if code == "s":
            out[next(names_iter)] = (offset, n)
            offset += n
            continue
        size = struct.calcsize("<" + code)
        for _ in range(n):  # "12H": twelve fields of one type
            out[next(names_iter)] = (offset, size)
            offset += size
    assert offset == st.size
    return out


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("gcc is needed to check bpf/include/events.h (apt-get install gcc)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>',
             '#include "%s"' % HEADER, "int main(void) {"]
    for struct_name, (_, names) in FIELDS.items():
        lines.append('printf("%s.sizeof %%zu\\n", sizeof(struct %s));' % (struct_name, struct_name))
        for name in names:
            lines.append('printf("%s.%s %%zu %%zu\\n", offsetof(struct %s, %s), '
                         "sizeof(((struct %s *)0)->%s));"
                         % (struct_name, name, struct_name, name, struct_name, name))
    lines.append('printf("data_event.data %zu\\n", offsetof(struct data_event, data));')
    lines.append('printf("exchange_event.head %zu\\n", offsetof(struct exchange_event, head));')
    lines.append('printf("pending_t.sizeof %zu\\n", sizeof(struct pending_t));')
    for name in PENDING_TAIL_FIELDS:
        lines.append('printf("pending_t.%s %%zu %%zu\\n", offsetof(struct pending_t, %s), '
                     'sizeof(((struct pending_t *)0)->%s));' % (name, name, name))
    for const in CONSTANTS:
        lines.append('printf("%s %%lld\\n", (long long)(%s));' % (const, const))
    lines.append("return 0; }")
    work = tmp_path_factory.mktemp("layout")
    src = work / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = work / "layout"
    subprocess.run([gcc, "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, *nums = line.split()
        values[key] = tuple(int(n) for n in nums) if len(nums) > 1 else int(nums[0])
    return values


@pytest.mark.parametrize("struct_name", sorted(FIELDS))
def test_struct_layout_matches_decoder(c_layout, struct_name):
    st, names = FIELDS[struct_name]
    assert c_layout["%s.sizeof" % struct_name] == st.size
    for name, (offset, size) in python_offsets(st, names).items():
        assert c_layout["%s.%s" % (struct_name, name)] == (offset, size), name


def test_data_follows_header(c_layout):
    assert c_layout["data_event.data"] == reader.DATA_HDR.size == 56
    assert c_layout["exchange_event.head"] == reader.EXCHANGE_HDR.size == 136


def test_pending_tail_matches_user_space(c_layout):
    """User space reads struct pending_t from its end (the head buffers' sizes are -D
    knobs): the tail layout must be the same whatever they are."""
    assert c_layout["pending_t.sizeof"] == PENDING_HEADS + reader.PENDING_TAIL.size
    for name, (offset, size) in python_offsets(reader.PENDING_TAIL, PENDING_TAIL_FIELDS).items():
        assert c_layout["pending_t.%s" % name] == (PENDING_HEADS + offset, size), name


def test_constants_match_enums(c_layout):
    for name, value in CONSTANTS.items():
        assert c_layout[name] == int(value), name


def test_kind_is_first_byte_of_every_record(c_layout):
    for struct_name in FIELDS:
        if struct_name != "h2_frame_hint":  # (not a record: entries inside DATA records)
            assert c_layout["%s.kind" % struct_name] == (0, 1)


# -- decoding -------------------------------------------------------------------------


def pack_data(data: bytes, size: int | None = None, **kw) -> bytes:
    size = len(data) if size is None else size
    return reader.DATA_HDR.pack(
        EventKind.DATA, kw.get("direction", 1), kw.get("source", 0), kw.get("role", 1),
        kw.get("tgid", 101), kw.get("tid", 102), kw.get("fd", 7), kw.get("gen", 555),
        kw.get("ts", 123456789), kw.get("pos", 4096), size, len(data),
        len(kw.get("hints", ()))) + data + b"".join(
            reader.FRAME_HINT.pack(offset, header, len(header))
            for offset, header in kw.get("hints", ()))


def test_decode_data_with_truncation():
    ev = reader.decode(pack_data(b"HTTP/1.1 200 OK\r\n", size=1 << 20))
    assert isinstance(ev, DataEvent)
    assert (ev.tgid, ev.tid, ev.fd, ev.generation, ev.timestamp_ns) == (101, 102, 7, 555, 123456789)
    assert ev.direction is Direction.EGRESS and ev.source is Source.SYSCALL
    assert (ev.position, ev.size, ev.data) == (4096, 1 << 20, b"HTTP/1.1 200 OK\r\n")
    assert ev.truncated and ev.key == (101, 7, 555)


def test_decode_data_with_http2_frame_headers():
    """Frame headers the kernel read past the captured bytes (bpf/http2_walk.h) follow
    them; keyed by distance before the chunk's end, a split one with its bytes only."""
    header = bytes.fromhex("004000" "00" "00" "00000001")  # DATA, 16384 bytes, stream 1
    raw = pack_data(b"x" * 100, size=40000, hints=[(16393, header), (39995, header[:5])])
    for ev in (reader.decode(raw), decode_in_place(raw)):
        assert ev.data == b"x" * 100 and ev.size == 40000
        assert ev.frames == {16393 - 40000: header, -5: header[:5]}
    assert reader.decode(pack_data(b"x", size=9)).frames is None
    with pytest.raises(reader.DecodeError):  # a count beyond the record
        reader.decode(pack_data(b"x" * 100, size=40000, hints=[(16393, header)])[:-1])
    with pytest.raises(reader.DecodeError):  # a short header not at the chunk's end
        reader.decode(pack_data(b"x" * 100, size=40000, hints=[(16393, header[:5])]))


def decode_in_place(raw: bytes):
    """The reader's hot path (RingReader.on_record), not decode()."""
    seen = []
    reader.RingReader(seen.append, None).on_record(raw, 0, len(raw))
    return seen[0]


def test_decode_open_ipv4_and_v4_mapped_and_unknown():
    laddr = bytes([127, 0, 0, 1]) + bytes(12)
    raddr = bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    raw = reader.CONN_OPEN.pack(EventKind.CONN_OPEN, Role.SERVER, 0, Protocol.HTTP2, 9, 10, 4,
                                77, 5, 2, 8080, 50000, laddr, laddr, b"nginx\0\0garbage", 0, 0)
    ev = reader.decode(raw)
    assert isinstance(ev, ConnOpenEvent) and ev.role is Role.SERVER
    assert (ev.local_address, ev.local_port, ev.remote_address, ev.remote_port) == (
        "127.0.0.1", 8080, "127.0.0.1", 50000)
    assert ev.comm == "nginx"
    raw6 = reader.CONN_OPEN.pack(EventKind.CONN_OPEN, Role.CLIENT, 0, Protocol.HTTP1, 9, 10, 4,
                                 77, 5, 10, 0, 443, bytes(16), raddr, bytes(16), 300, 1200)
    ev6 = reader.decode(raw6)
    assert (ev6.local_address, ev6.local_port, ev6.remote_address, ev6.remote_port) == (
        None, None, "10.1.2.3", 443)
    raw0 = reader.CONN_OPEN.pack(EventKind.CONN_OPEN, Role.UNKNOWN, 0, 0, 9, 10, 4, 77, 5, 0, 0,
                                 0, bytes(16), bytes(16), bytes(16), 0, 0)
    ev0 = reader.decode(raw0)
    assert ev0.role is Role.UNKNOWN and ev0.local_address is None and ev0.remote_address is None
    assert ev6.comm is None
    assert ev.stream_start == (0, 0) and ev6.stream_start == (300, 1200)
    assert ev.protocol is Protocol.HTTP2 and ev6.protocol is Protocol.HTTP1
    assert ev0.protocol is Protocol.UNKNOWN
    # an id from a newer kernel side stays a number (conntrack then sniffs the bytes)
    raw9 = reader.CONN_OPEN.pack(EventKind.CONN_OPEN, Role.SERVER, 0, 9, 9, 10, 4, 77, 5, 0, 0,
                                 0, bytes(16), bytes(16), bytes(16), 0, 0)
    assert reader.decode(raw9).protocol == 9


def test_decode_close():
    raw = reader.CONN_CLOSE.pack(EventKind.CONN_CLOSE, 1, 0, 9, 10, 4, 77, 5, 100, 200)
    ev = reader.decode(raw)
    assert isinstance(ev, ConnCloseEvent) and ev.key == (9, 4, 77) and ev.source is Source.OPENSSL
    assert ev.reset is False
    raw = reader.CONN_CLOSE.pack(EventKind.CONN_CLOSE, 0, 1, 9, 10, 4, 77, 5, 100, 200)
    ev = reader.decode(raw)
    assert ev.reset is True and ev.source is Source.SYSCALL and ev.timestamp_ns == 5


@pytest.mark.parametrize("raw", [
    b"",
    b"\x09" + bytes(60),  # unknown kind
    pack_data(b"abc")[:40],  # shorter than the header
    pack_data(b"abcdef")[:-2],  # fewer bytes than captured_len says
    pack_data(b"abc", direction=5),  # unknown direction
])
def test_bad_records_raise_decode_error(raw):
    with pytest.raises(reader.DecodeError):
        reader.decode(raw)


def test_reader_counts_and_survives_bad_records_and_handler_errors():
    import ctypes

    from otel_ebpf.stats import Stats

    seen = []

    def handler(event):
        seen.append(event)
        if len(seen) == 2:
            raise RuntimeError("downstream bug")

    stats = Stats()
    r = reader.RingReader(handler, stats)
    records = [pack_data(b"GET / HTTP/1.1\r\n")] * 3 + [b"\x09" + bytes(8)]
    for raw in records:
        buf = ctypes.create_string_buffer(raw, len(raw))
        r.callback(None, ctypes.addressof(buf), len(raw))
    r.flush_stats()
    assert len(seen) == 3
    assert stats.get("capture.events") == 3
    assert stats.get("capture.decode_errors") == 1
    assert stats.get("capture.callback_errors") == 1


def test_decode_cost_is_printed():
    """The per-event Python cost (copy + decode), printed for the report; speed is the
    benchmark's verdict, not this test's: it checks every call decoded one event."""
    import ctypes

    raw = pack_data(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = ctypes.create_string_buffer(raw, len(raw))
    r = reader.RingReader(lambda e: None, None)
    address = ctypes.addressof(buf)
    n = 20000
    best = min(timeit.repeat(lambda: r.callback(None, address, len(raw)), number=n, repeat=3)) / n
    print("decode+dispatch: %.2f us/event (%.0f events/s)" % (best * 1e6, 1 / best))
    assert (r.events, r.decode_errors, r.callback_errors) == (3 * n, 0, 0)


def test_reader_stops_a_poll_once_its_time_budget_is_spent():
    """libbpf stops draining when the callback returns < 0; the reader does so (checked
    every 256 events) once `deadline` has passed, so one poll cannot starve the loop."""
    import ctypes

    raw = pack_data(b"GET / HTTP/1.1\r\n\r\n")
    buf = ctypes.create_string_buffer(raw, len(raw))
    seen = []
    r = reader.RingReader(seen.append, None)
    returns = [r.callback(None, ctypes.addressof(buf), len(raw)) for _ in range(300)]
    assert set(returns) == {0}  # no deadline: drain everything
    r.deadline = 0.0  # long past
    returns = [r.callback(None, ctypes.addressof(buf), len(raw)) for _ in range(300)]
    assert len(seen) == 600  # the record that hits the budget is still delivered
    assert [i for i, ret in enumerate(returns) if ret < 0] == [211]  # the 512th event


def test_every_kernel_counter_has_a_stats_name():
    assert set(STATS_NAMES) == set(LOSS_COUNTERS)
