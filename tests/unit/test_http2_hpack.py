"""HeaderBlockDecoder: hpack's decoder, decoding what it can of an unknown dynamic table."""

from __future__ import annotations

from hpack import Encoder

from otel_ebpf.protocols.http2.hpack_decoder import MAX_TABLE_SIZE, HeaderBlockDecoder

REQUEST = [(":method", "GET"), (":scheme", "https"), (":path", "/a"), (":authority", "h"),
           ("user-agent", "ua/1"), ("x-tenant", "t1")]


def _pairs(headers):
    return [(n.encode(), v.encode()) for n, v in headers]


def test_a_decoder_that_saw_every_block_decodes_everything():
    encoder, decoder = Encoder(), HeaderBlockDecoder(65536)
    for path in ("/a", "/b", "/a"):
        headers = [*REQUEST[:2], (":path", path), *REQUEST[3:]]
        assert decoder.decode(encoder.encode(headers)) == (_pairs(headers), 0)


def test_unknown_dynamic_entries_are_left_out_and_counted_never_guessed():
    encoder = Encoder()
    encoder.encode(REQUEST)  # inserted before the observer attached
    decoder = HeaderBlockDecoder(65536)
    # Indexed user-agent/x-tenant/:authority/:path are unknown; the static :method and
    # :scheme and the new literal are known.
    fields, unknown = decoder.decode(encoder.encode([*REQUEST, ("x-new", "n")]))
    assert fields == _pairs([(":method", "GET"), (":scheme", "https"), ("x-new", "n")])
    assert unknown == 4
    # x-new was inserted while we watched: known from now on, at the right position
    # although older (unknown) entries sit behind it.
    fields, unknown = decoder.decode(encoder.encode([("x-new", "n"), ("user-agent", "ua/1")]))
    assert (fields, unknown) == (_pairs([("x-new", "n")]), 1)


def test_an_insertion_with_an_unknown_name_keeps_later_positions_right():
    encoder = Encoder()
    encoder.encode([("x-custom", "old")])  # name inserted unseen
    decoder = HeaderBlockDecoder(65536)
    # "x-custom: new" is a literal whose *name* refers to the unknown entry: its value
    # is inserted with an unknown name; "x-after" is inserted after it.
    fields, unknown = decoder.decode(encoder.encode([("x-custom", "new"), ("x-after", "1")]))
    assert (fields, unknown) == (_pairs([("x-after", "1")]), 1)
    fields, unknown = decoder.decode(
        encoder.encode([("x-after", "1"), ("x-custom", "new"), ("x-custom", "old")]))
    assert (fields, unknown) == (_pairs([("x-after", "1")]), 2)


def test_table_size_updates_and_settings_do_not_lose_entries():
    encoder, decoder = Encoder(), HeaderBlockDecoder(65536)
    decoder.allow_table_size(16384)  # the decoding peer's SETTINGS_HEADER_TABLE_SIZE
    encoder.header_table_size = 16384  # the encoder grows its table (size update)
    big = [(f"x-h{i}", "v" * 200) for i in range(40)]  # ~9 KiB: more than 4096
    assert decoder.decode(encoder.encode(big)) == (_pairs(big), 0)
    assert decoder.decode(encoder.encode(big)) == (_pairs(big), 0)
    encoder.header_table_size = 0  # clears the encoder's table; ours keeps its entries
    assert decoder.decode(encoder.encode(big[:3])) == (_pairs(big[:3]), 0)
    decoder.allow_table_size(1 << 30)
    assert decoder.table_bytes() <= MAX_TABLE_SIZE


def test_a_block_that_does_not_decode_is_lost_and_resets_the_table():
    encoder, decoder = Encoder(), HeaderBlockDecoder(65536)
    assert decoder.decode(encoder.encode(REQUEST))[1] == 0
    assert decoder.decode(b"\x00\x85\xff\xff\xff\xff\xff\x01a") == (None, 0)  # bad Huffman
    fields, unknown = decoder.decode(encoder.encode(REQUEST))
    assert unknown == 4 and fields == _pairs(REQUEST[:2])


def test_the_block_cache_never_serves_a_result_from_another_table_state():
    decoder = HeaderBlockDecoder(65536)
    newest = bytes([0x80 | 62])  # "the most recently inserted entry"
    encoder = Encoder()
    decoder.decode(encoder.encode([("x-one", "1")]))
    assert decoder.decode(newest) == ([(b"x-one", b"1")], 0)
    assert decoder.decode(newest) == ([(b"x-one", b"1")], 0)  # from the cache
    decoder.decode(encoder.encode([("x-two", "2")]))
    assert decoder.decode(newest) == ([(b"x-two", b"2")], 0)
    decoder.lost_block()
    assert decoder.decode(newest) == ([], 1)
