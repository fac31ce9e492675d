"""HeaderBlockDecoder's block caches: every result and every table state exactly as
decoding each block afresh gives (hpack's own Decoder is the reference)."""

from __future__ import annotations

from hpack import Decoder
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

from otel_ebpf.protocols.http2.hpack_decoder import HeaderBlockDecoder

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode

# A response block of nginx 1.22 as captured (h2c, a static file): :status 200 indexed,
# then server, date, content-type, content-length, last-modified, etag and accept-ranges
# as literals with a static name, each *inserted* into the dynamic table.
NGINX_RESPONSE = bytes.fromhex(
    "887689aa6355e580ae212e1f6196dd6d5f4a01c52f948a080271400ae36edc640a62d1bf5f87497ca5"
    "89d34d1f5c033631366c96dd6d5f4a01c52f948a080271400ae36edc13ea62d1bf00832a47378bfe5c"
    "8c2d1250beb09c7bf9008919085ad2b583aa62a3848fd24a8f"
)


def _string(value: bytes, huffman: bool = True) -> bytes:
    return _prefixed(_huffman(value), 0x80) if huffman else _prefixed(value, 0)


def _prefixed(data: bytes, flag: int) -> bytes:
    length = bytearray(encode_integer(len(data), 7))
    length[0] |= flag
    return bytes(length) + data


def inserting(static_index: int, value: bytes, huffman: bool = True) -> bytes:
    """A literal with incremental indexing whose name is a static entry (nginx's way)."""
    return bytes([0x40 | static_index]) + _string(value, huffman)


def indexed(index: int) -> bytes:
    assert 0 < index < 127
    return bytes([0x80 | index])


def _reference() -> Decoder:
    decoder = Decoder(max_header_list_size=1 << 20)
    decoder.max_allowed_table_size = 1 << 32
    return decoder


def _same_as_reference(blocks: list[bytes]) -> HeaderBlockDecoder:
    """Decode `blocks` in order with both decoders; fields and table state must agree
    after every block."""
    ours, reference = HeaderBlockDecoder(1 << 20), _reference()
    for i, block in enumerate(blocks):
        expected = [tuple(f) for f in reference.decode(block, raw=True)]
        fields, unknown = ours.decode(block)
        assert unknown == 0
        assert [tuple(f) for f in fields] == expected, i
        assert list(ours._table.dynamic_entries) == list(
            reference.header_table.dynamic_entries), i
        assert ours.table_bytes() == reference.header_table._current_size, i
    return ours


def test_repeated_nginx_responses_replay_their_insertions():
    ours = _same_as_reference([NGINX_RESPONSE] * 50)
    assert NGINX_RESPONSE in ours._self_contained


def test_self_contained_blocks_are_shared_by_decoders_with_the_same_list_limit():
    first, second = HeaderBlockDecoder(1_000_003), HeaderBlockDecoder(1_000_003)
    assert first.decode(NGINX_RESPONSE) == second.decode(NGINX_RESPONSE)
    assert first._self_contained is second._self_contained
    assert len(first._self_contained) == 1  # decoded once
    assert list(first._table.dynamic_entries) == list(second._table.dynamic_entries)
    assert first.table_bytes() == second.table_bytes() > 0
    # a smaller limit is another cache: its decoding may fail where this one did not
    small = HeaderBlockDecoder(100)
    assert small._self_contained is not first._self_contained
    assert small.decode(NGINX_RESPONSE) == (None, 0)


def test_replays_evict_exactly_as_decoding_does():
    big = inserting(54, b"s" * 1500) + inserting(33, b"d" * 1200) + inserting(31, b"t" * 900)
    huge = inserting(34, b"x" * 5000, huffman=False)  # larger than the table: empties it
    small = inserting(28, b"616") + inserting(34, b'"etag"')
    refers = indexed(62) + indexed(63)  # depends on the table: never self-contained
    blocks = [NGINX_RESPONSE, big, small, big, refers, NGINX_RESPONSE, huge, small, refers,
              huge, big, big, small, small, NGINX_RESPONSE, refers, big, huge, huge]
    _same_as_reference(blocks * 3)


def test_a_block_that_refers_to_dynamic_entries_is_not_served_across_table_changes():
    ours = HeaderBlockDecoder(65536)
    one, two = inserting(58, b"agent/1"), inserting(58, b"agent/2")
    newest = indexed(62)
    ours.decode(one)
    assert ours.decode(newest) == ([(b"user-agent", b"agent/1")], 0)
    ours.decode(two)  # a replayed insertion must invalidate too
    assert ours.decode(newest) == ([(b"user-agent", b"agent/2")], 0)
    ours.decode(one)  # replayed from the self-contained cache
    assert ours.decode(newest) == ([(b"user-agent", b"agent/1")], 0)
    ours.lost_block()
    assert ours.decode(newest) == ([], 1)
    ours.decode(two)  # self-contained blocks stay valid across a reset
    assert ours.decode(newest) == ([(b"user-agent", b"agent/2")], 0)


def test_a_table_size_update_is_never_replayed():
    ours = HeaderBlockDecoder(65536)
    block = b"\x3f\xe1\x1f" + inserting(58, b"agent")  # size update to 4096, then a literal
    for _ in range(3):
        assert ours.decode(block) == ([(b"user-agent", b"agent")], 0)
    assert block not in ours._self_contained


# RFC 7541 Appendix C: C.3/C.4 requests (without/with Huffman), C.5/C.6 responses
# (the encoder's table is 256 bytes: it evicts; the observer's keeps more, which changes
# no index the encoder uses). Each sequence twice in a row: the second pass hits the
# caches and must decode the same.
C3 = ["828684410f7777772e6578616d706c652e636f6d",
      "828684be58086e6f2d6361636865",
      "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"]
C4 = ["828684418cf1e3c2e5f23a6ba0ab90f4ff",
      "828684be5886a8eb10649cbf",
      "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]
C5 = ["4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a32"
      "3120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
      "4803333037c1c0bf",
      "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a6970"
      "7738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d61"
      "67653d333630303b2076657273696f6e3d31"]
C6 = ["488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad17"
      "1863c78f0b97c8e9ae82ae43d3",
      "4883640effc1c0bf",
      "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6"
      "c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"]

C3_FIELDS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]
C5_FIELDS = [
    [(b":status", b"302"), (b"cache-control", b"private"),
     (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"location", b"https://www.example.com")],
    [(b":status", b"307"), (b"cache-control", b"private"),
     (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"location", b"https://www.example.com")],
    [(b":status", b"200"), (b"cache-control", b"private"),
     (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"), (b"location", b"https://www.example.com"),
     (b"content-encoding", b"gzip"),
     (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")],
]


def test_rfc7541_appendix_c_sequences_decode_the_same_from_the_caches():
    for blocks, expected in ((C3, C3_FIELDS), (C4, C3_FIELDS), (C5, C5_FIELDS),
                             (C6, C5_FIELDS)):
        raw = [bytes.fromhex(b) for b in blocks]
        ours = HeaderBlockDecoder(65536)
        for _ in range(2):
            for block, fields in zip(raw, expected):
                got, unknown = ours.decode(block)
                assert unknown == 0 and [tuple(f) for f in got] == fields
        _same_as_reference(raw * 3)


def test_random_mixes_of_cached_and_fresh_blocks():
    import random

    rng = random.Random(7541)
    pool = [
        b"".join(inserting(rng.choice((28, 31, 33, 34, 54, 58)), bytes([97 + j]) * rng.choice(
            (1, 40, 300, 900, 2500, 4100)), huffman=rng.random() < 0.5)
            for j in range(rng.randint(1, 4)))
        for _ in range(12)
    ]
    pool.append(NGINX_RESPONSE)
    for _ in range(5):
        _same_as_reference([rng.choice(pool) for _ in range(300)])


def test_repeated_heads_read_from_the_same_fields_give_each_stream_its_own_values():
    # h2's encoder indexes what it sent: a repeated request or response is all-indexed,
    # served from the block cache as the same list, whose head the session reads once.
    from otel_ebpf.exchange import Role
    from tests.unit.test_http2_support import H2Pair, make_session, replay

    pair = H2Pair()
    plan = [("/a", 200), ("/a", 200), ("/b", 404), ("/a", 200), ("/a", 103)]
    for path, status in plan:
        sid = pair.request(path, extra=[("user-agent", "ua/1"), ("x-req", path)])
        if status == 103:  # an interim head first, then the final one
            pair.server.send_headers(sid, [(":status", "103")])
            status = 200
        pair.respond(sid, status, body=b"x" * (len(path) + status % 7),
                     extra=[("server", "s/1"), ("x-resp", str(status))])
    session = make_session(Role.SERVER, capture_request_headers=["x-req"],
                           capture_response_headers=["x-resp"])
    out = replay(session, pair.chunks)
    final = [(path, 200 if status == 103 else status) for path, status in plan]
    assert [(x.target, x.status_code, x.request_headers, x.response_headers,
             x.response_body_size) for x in out] == [
        (path, status, (("x-req", path),), (("x-resp", str(status)),), len(path) + status % 7)
        for path, status in final
    ]
    assert [x.stream_id for x in out] == [1, 3, 5, 7, 9]
    assert all(x.user_agent == "ua/1" and x.method == "GET" for x in out)


def test_only_small_self_contained_blocks_are_kept():
    from otel_ebpf.protocols.http2 import hpack_decoder

    ours = HeaderBlockDecoder(1_000_033)
    many = indexed(2) * (hpack_decoder.SELF_CONTAINED_MAX_FIELDS + 1)
    large = inserting(58, b"u" * hpack_decoder.SELF_CONTAINED_MAX_BLOCK, huffman=False)
    for block in (many, large, many, large):
        fields, unknown = ours.decode(block)
        assert unknown == 0 and fields
    assert not ours._self_contained
