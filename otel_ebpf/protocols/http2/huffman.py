"""HPACK Huffman decoding (RFC 7541 5.2, Appendix B), a byte at a time.

hpack's decoder walks a state machine a nibble at a time (two table lookups, flag tests
and a bytearray append per input byte), ~19 % of the daemon's time when blocks miss the
caches. Here each state of the code tree (its 256 internal nodes) has a row of 256
entries, one per input byte: the state after that byte and the symbols it completed,
as bytes. Decoding is then one subscript and one unpacking per input byte.

Errors, as RFC 7541 5.2 and hpack have them: the EOS symbol inside a string, and
padding that is longer than 7 bits or not the most significant bits of EOS (all ones):
the walk must end at the root or at a node reached by at most 7 one bits.
"""

from __future__ import annotations

from hpack import HPACKDecodingError
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

_EOS = 256


def _build() -> tuple[list[tuple[int, bytes] | None], list[bool]]:
    # The code tree: node 0 is the root; a leaf holds its symbol.
    children: list[list[int]] = [[-1, -1]]
    symbol: list[int] = [-1]
    for sym, (code, length) in enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH)):
        node = 0
        for shift in range(length - 1, -1, -1):
            bit = (code >> shift) & 1
            child = children[node][bit]
            if child < 0:
                child = len(symbol)
                children.append([-1, -1])
                symbol.append(-1)
                children[node][bit] = child
            node = child
        symbol[node] = sym
    internal = [node for node in range(len(symbol)) if symbol[node] < 0]
    state_of = {node: i for i, node in enumerate(internal)}
    # A valid end: the bits since the last symbol are all ones, at most 7 of them.
    accepts = [False] * len(internal)
    node, depth = 0, 0
    while symbol[node] < 0 and depth <= 7:
        accepts[state_of[node]] = True
        node, depth = children[node][1], depth + 1
    table: list[tuple[int, bytes] | None] = []
    for node in internal:
        for byte in range(256):
            current = node
            out = bytearray()
            for shift in range(7, -1, -1):
                current = children[current][(byte >> shift) & 1]
                sym = symbol[current]
                if sym >= 0:
                    if sym == _EOS:
                        break
                    out.append(sym)
                    current = 0
            else:
                table.append((state_of[current] << 8, bytes(out)))
                continue
            table.append(None)  # EOS inside the string
    return table, accepts


_TABLE, _ACCEPTS = _build()


def decode_huffman(data: bytes) -> bytes:
    """The string Huffman-coded in `data`; HPACKDecodingError when it is not valid."""
    table = _TABLE
    state = 0  # the current tree node's row offset (its index << 8)
    out = []
    append = out.append
    try:
        for byte in data:
            state, symbols = table[state | byte]  # type: ignore[misc]
            if symbols:
                append(symbols)
    except TypeError:  # the None entry: EOS decoded
        raise HPACKDecodingError("EOS in a Huffman string") from None
    if not _ACCEPTS[state >> 8]:
        raise HPACKDecodingError("Incomplete Huffman string")
    return b"".join(out)
