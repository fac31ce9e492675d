"""HPACK Huffman decoding (RFC 7541 5.2, Appendix B), a byte at a time.

hpack's decoder walks a state machine a nibble at a time (two table lookups, flag tests
and a bytearray append per input byte), ~19 % of the daemon's time when blocks miss the
caches. Here each state of the code tree (its 256 internal nodes) has a row of 256
entries, one per input byte: the state after that byte and the symbols it completed,
as bytes. Decoding is then two subscripts per input byte.

Memory: the 65,536 entries are kept as an array of 16-bit next states and a list of
symbol strings shared between entries (17,665 distinct): ~1.3 MB of structures, ~4 MB
of resident memory after the import (with the build's allocator leftovers), where a
list of (state, bytes) tuples added 11.6 MB to the daemon's.

Errors, as RFC 7541 5.2 and hpack have them: the EOS symbol inside a string, and
padding that is longer than 7 bits or not the most significant bits of EOS (all ones):
the walk must end at the root or at a node reached by at most 7 one bits.
"""

from __future__ import annotations

from array import array

from hpack import HPACKDecodingError
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

_EOS = 256


def _build() -> tuple[array, list[bytes | None], list[bool]]:
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
    next_state = array("H")  # row offset (state index << 8) after each (state, byte)
    symbols_of: list[bytes | None] = []  # symbols completed; None: EOS inside the string
    shared: dict[bytes, bytes] = {}
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
                next_state.append(state_of[current] << 8)
                symbols = bytes(out)
                symbols_of.append(shared.setdefault(symbols, symbols))
                continue
            next_state.append(0)
            symbols_of.append(None)  # EOS inside the string
    return next_state, symbols_of, accepts


_NEXT, _SYMBOLS, _ACCEPTS = _build()


def decode_huffman(data: bytes) -> bytes:
    """The string Huffman-coded in `data`; HPACKDecodingError when it is not valid."""
    next_state = _NEXT
    symbols_of = _SYMBOLS
    state = 0  # the current tree node's row offset (its index << 8)
    out = []
    append = out.append
    for byte in data:
        i = state | byte
        symbols = symbols_of[i]
        if symbols:
            append(symbols)
        elif symbols is None:
            raise HPACKDecodingError("EOS in a Huffman string")
        state = next_state[i]
    if not _ACCEPTS[state >> 8]:
        raise HPACKDecodingError("Incomplete Huffman string")
    return b"".join(out)
