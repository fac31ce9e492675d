"""decode_block and the Huffman decoder against hpack's Decoder (the reference they
replace): the same fields, the same table, the same inputs rejected."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder, HPACKError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman as reference_huffman

from otel_ebpf.protocols.http2.hpack_decoder import _ObserverTable, decode_block
from otel_ebpf.protocols.http2.huffman import decode_huffman
from tests.unit.test_http2_hpack_cache import C3, C3_FIELDS, C4, C5, C5_FIELDS, C6

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode


def _outcome(decode, data):
    try:
        return "ok", decode(data)
    except HPACKError:
        return "error", None


def test_rfc7541_appendix_c_huffman_strings():
    # C.4.1-C.4.3 and C.6.1-C.6.3: the Huffman-coded strings of the examples
    for coded, text in [
        ("f1e3c2e5f23a6ba0ab90f4ff", b"www.example.com"),
        ("a8eb10649cbf", b"no-cache"),
        ("25a849e95ba97d7f", b"custom-key"),
        ("25a849e95bb8e8b4bf", b"custom-value"),
        ("6402", b"302"),
        ("aec3771a4b", b"private"),
        ("d07abe941054d444a8200595040b8166e082a62d1bff", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        ("9d29ad171863c78f0b97c8e9ae82ae43d3", b"https://www.example.com"),
        ("640eff", b"307"),
        ("9bd9ab", b"gzip"),
        ("94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b10"
         "63d5007", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
    ]:
        assert decode_huffman(bytes.fromhex(coded)) == text


def test_huffman_agrees_with_hpack_on_valid_corrupted_and_random_strings():
    rng = random.Random(52)
    for _ in range(20000):
        kind = rng.random()
        if kind < 0.4:
            data = _huffman(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
            if data and rng.random() < 0.5:
                flipped = bytearray(data)
                flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                data = bytes(flipped)
        elif kind < 0.7:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
        else:  # runs of ones: padding of every length, EOS
            ones = (0xFF, 0xFF, 0xFE, 0x7F, 0x00)
            data = bytes(rng.choice(ones) for _ in range(rng.randrange(8)))
        assert _outcome(decode_huffman, data) == _outcome(reference_huffman, data), data.hex()


def _reference(max_list: int) -> Decoder:
    decoder = Decoder(max_header_list_size=max_list)
    decoder.header_table = _ObserverTable()
    decoder.max_allowed_table_size = 1 << 32
    return decoder


def _agree(blocks, max_list=65536):
    """Each block through both decoders, each with its own observer table: the same
    fields or the same rejection, and the same table afterwards (reset on errors, as
    HeaderBlockDecoder does)."""
    reference, ours = _reference(max_list), _ObserverTable()
    rejected = 0
    for block in blocks:
        expected = _outcome(lambda b: [tuple(f) for f in reference.decode(b, raw=True)], block)
        got = _outcome(lambda b: decode_block(b, ours, max_list), block)
        assert got == expected, block.hex()
        if got[0] == "error":
            rejected += 1
            ours.reset()
            reference.header_table.reset()
        table = reference.header_table
        assert list(ours.dynamic_entries) == list(table.dynamic_entries), block.hex()
        assert (ours._current_size, ours.maxsize, ours.unknown_lookups) == (
            table._current_size, table.maxsize, table.unknown_lookups)
    return rejected


def test_rfc7541_appendix_c_blocks():
    for blocks, fields in ((C3, C3_FIELDS), (C4, C3_FIELDS), (C5, C5_FIELDS),
                           (C6, C5_FIELDS)):
        table = _ObserverTable()
        assert [decode_block(bytes.fromhex(b), table, 65536) for b in blocks] == fields
        assert _agree([bytes.fromhex(b) for b in blocks]) == 0


def _encoded_blocks(rng):
    encoder = Encoder()
    names = ["x-a", "x-b", ":path", "user-agent", "traceparent", "date", "cookie"]
    for _ in range(60):
        if rng.random() < 0.1:
            encoder.header_table_size = rng.choice((0, 256, 4096, 8192))
        headers = [(rng.choice(names), "v%d" % rng.randrange(6) * rng.randrange(1, 60))
                   for _ in range(rng.randrange(1, 6))]
        yield encoder.encode(headers, huffman=rng.random() < 0.7)


def _mutated(rng, block):
    data = bytearray(block)
    for _ in range(rng.randrange(1, 3)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice < 0.7 and data:
            del data[rng.randrange(len(data)):]
        else:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
    return bytes(data)


@pytest.mark.parametrize("seed", range(6))
def test_blocks_agree_with_hpack_valid_mutated_and_random(seed):
    rng = random.Random(seed)
    blocks = []
    for block in _encoded_blocks(rng):
        blocks.append(block)
        if rng.random() < 0.5:
            blocks.append(_mutated(rng, block))
        if rng.random() < 0.1:
            blocks.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))))
    # special cases: index 0, size update after a field, a long integer, oversized lists
    blocks += [b"\x80", b"\x82\x20", b"\x3f\xff\xff\xff\xff\x0f", b"\x3f\xff\xff\xff\xff\xff\x01",
               b"\xff\xff\xff\xff\xff\x7f", b"\xff\xff\xff\xff\xff\xff\x01",
               b"\x00\x01a\x7f\x00"]
    assert _agree(blocks) > 0
    assert _agree(blocks, max_list=200) > 0
