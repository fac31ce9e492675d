"""HPACK decoding for a passive observer, on the `hpack` library's table.

One `HeaderBlockDecoder` per connection direction (each direction has its own encoder
and dynamic table). The `hpack` library (python-hyper) gives the static table, the
dynamic table's insertions and evictions (`HeaderTable`) and the errors; the block walk
(`decode_block`: integers, literals) and the Huffman decoder (huffman.py) are ours, the
same decoding as hpack's `Decoder` (tested against it) at a third of its cost.
What an observer needs beyond a normal decoder, and how it gets it:

- **An unknown dynamic table.** A connection seen mid-stream (or after bytes of a
  header block were lost) has dynamic table entries we never saw inserted. A normal
  decoder cannot decode partially: an unknown index raises and the block is lost. So
  the decoder's table is `_ObserverTable`, whose lookup answers an index it does
  not know with the `UNKNOWN` marker instead of raising. The block then decodes in full;
  fields whose name is `UNKNOWN` are dropped and counted, never guessed.

  Why the entries we do know are exact: dynamic index 62 + i names the i-th most recent
  insertion (RFC 7541 2.3.3). Every insertion since the table was last reset was seen
  (resetting is what happens when header block bytes are lost), so an index below
  62 + len(known) names exactly the entry we hold; anything beyond it is unknown.
  An insertion whose name is unknown is kept as (UNKNOWN, value) so the positions of the
  others stay right.

- **Table sizes.** The encoder's table may grow up to what its peer allowed in SETTINGS,
  and it evicts when it shrinks. Keeping *more* entries than the encoder does is
  harmless (it never refers past its own table) while keeping fewer makes them unknown,
  so the observer table never shrinks and grows to the largest size seen, capped at
  `MAX_TABLE_SIZE` for memory. Table size updates are accepted whatever their value
  (it is not ours to enforce the peer's limit).

A block that does not decode at all (malformed Huffman, truncated block, oversized
list) is lost: `decode` returns None and the table is reset, as its insertions are
unknown from then on.
"""

from __future__ import annotations

from hpack import (
    HPACKDecodingError,
    HPACKError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.table import HeaderTable

from otel_ebpf.protocols.http2.huffman import decode_huffman

# Marker for a header name or value we cannot know (NUL is never valid in a field name).
UNKNOWN = b"\x00unknown"
_UNKNOWN_PAIR = (UNKNOWN, UNKNOWN)
_STATIC_LENGTH = HeaderTable.STATIC_TABLE_LENGTH

# The largest dynamic table this observer keeps per direction (the HPACK accounting:
# 32 bytes plus name and value per entry). Real peers use 4 KiB (the default) to 64 KiB.
MAX_TABLE_SIZE = 64 * 1024


class _ObserverTable(HeaderTable):
    """A HeaderTable that answers unknown dynamic indices with UNKNOWN and never shrinks.

    It also tells the block cache what a decoding depended on and did: `dynamic_lookups`
    and `size_updates` count references to dynamic entries and table size updates, and
    while `added` is a list every insertion is appended to it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.unknown_lookups = 0
        self.dynamic_lookups = 0
        self.size_updates = 0
        self.added: list[tuple[bytes, bytes]] | None = None
        self.generation = 0  # bumped by every change of the entries (see the block cache)

    def add(self, name: bytes, value: bytes) -> None:
        # HeaderTable.add without its per-eviction debug logging (also the replay path of
        # the block cache): an entry costs 32 + len(name) + len(value) (RFC 7541 4.1); one
        # larger than the table empties it (4.4).
        self.generation += 1
        added = self.added
        if added is not None:
            added.append((name, value))
        entries = self.dynamic_entries
        size = 32 + len(name) + len(value)
        maxsize = self._maxsize
        if size > maxsize:
            entries.clear()
            self._current_size = 0
            return
        entries.appendleft((name, value))
        size += self._current_size
        while size > maxsize:
            evicted_name, evicted_value = entries.pop()
            size -= 32 + len(evicted_name) + len(evicted_value)
        self._current_size = size

    def replay(self, insertions: tuple[tuple[bytes, bytes], ...], size: int) -> None:
        """Insert these entries, oldest first, as `add` one by one would; `size` is their
        total entry size. Evicting once at the end leaves what evicting after each would:
        the oldest entries go first either way, and what is kept is the newest entries
        that fit (none of those before an entry larger than the table, as `add`'s
        emptying the table gives)."""
        self.generation += 1
        entries = self.dynamic_entries
        entries.extendleft(insertions)  # the last inserted ends up first (index 62)
        size += self._current_size
        maxsize = self._maxsize
        while size > maxsize:
            evicted_name, evicted_value = entries.pop()
            size -= 32 + len(evicted_name) + len(evicted_value)
        self._current_size = size

    def get_by_index(self, index: int) -> tuple[bytes, bytes]:
        if index > _STATIC_LENGTH:
            self.dynamic_lookups += 1
            dynamic = index - _STATIC_LENGTH - 1
            entries = self.dynamic_entries
            if dynamic < len(entries):
                return entries[dynamic]
            self.unknown_lookups += 1
            return _UNKNOWN_PAIR
        return super().get_by_index(index)  # static entry, or index 0 (invalid: raises)

    @property  # type: ignore[override]
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        # Grow to the largest size seen (capped); never shrink: see the module docstring.
        self.size_updates += 1
        newmax = min(int(newmax), MAX_TABLE_SIZE)
        if newmax > self._maxsize:
            self._maxsize = newmax

    def reset(self) -> None:
        """Forget every entry: insertions were lost, all dynamic indices become unknown."""
        self.generation += 1
        self.dynamic_entries.clear()
        self._current_size = 0


# Table size updates are accepted up to this (what hpack's decoder was allowed: the
# limit is between the peers, not ours to check; beyond 32 bits no SETTINGS can say it).
_MAX_TABLE_SIZE_UPDATE = 1 << 32
# Longest integer accepted, in bytes after the prefix (hpack's limit: enough for 32 bits).
_VARINT_MAX_LENGTH = 5


def _integer(data: bytes, pos: int, number: int) -> tuple[int, int]:
    """An integer whose prefix was all ones (`number`): add the continuation bytes
    from `pos` on (RFC 7541 5.1). -> (value, position after it)."""
    shift = 0
    count = 0
    try:
        while True:
            byte = data[pos]
            pos += 1
            count += 1
            number += (byte & 0x7F) << shift
            if byte < 0x80:
                return number, pos
            shift += 7
            if count >= _VARINT_MAX_LENGTH:
                raise HPACKDecodingError("HPACK integer too long")
    except IndexError:
        raise HPACKDecodingError("Truncated HPACK integer") from None


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    """A string literal at `pos` (RFC 7541 5.2). -> (bytes, position after it)."""
    try:
        first = data[pos]
    except IndexError:
        raise HPACKDecodingError("Truncated header block") from None
    length = first & 0x7F
    pos += 1
    if length == 0x7F:
        length, pos = _integer(data, pos, length)
    end = pos + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block")
    if first & 0x80:
        return decode_huffman(data[pos:end]), end
    return data[pos:end], end


def decode_block(data: bytes, table: _ObserverTable, max_list: int) -> list[tuple[bytes, bytes]]:
    """The fields of one header block, in order, inserting into `table` as the block
    says (RFC 7541 6). Raises an HPACKError where hpack's Decoder does: a truncated
    block or integer, invalid Huffman, index 0, a table size update after a field, a
    decoded list larger than `max_list` (32 + name + value per field, as hpack counts).

    hpack's Decoder decoded the same, a field at a time through memoryview slices and
    copies of the block's rest; this is the same walk without them (and without its
    per-field debug logging), with the byte-at-a-time Huffman decoder of huffman.py."""
    fields: list[tuple[bytes, bytes]] = []
    append = fields.append
    get_by_index = table.get_by_index
    inflated = 0
    pos = 0
    end = len(data)
    while pos < end:
        first = data[pos]
        pos += 1
        if first & 0x80:  # indexed field (6.1)
            index = first & 0x7F
            if index == 0x7F:
                index, pos = _integer(data, pos, index)
            field = get_by_index(index)
        elif first & 0x40 or not first & 0x20:
            # literal with incremental indexing (6.2.1; 6-bit index), without indexing
            # (6.2.2) or never indexed (6.2.3; 4-bit index)
            if first & 0x40:
                index = first & 0x3F
                if index == 0x3F:
                    index, pos = _integer(data, pos, index)
            else:
                index = first & 0x0F
                if index == 0x0F:
                    index, pos = _integer(data, pos, index)
            if index:
                name = get_by_index(index)[0]
            else:
                name, pos = _string(data, pos)
            value, pos = _string(data, pos)
            field = (name, value)
            if first & 0x40:
                table.add(name, value)
        else:  # dynamic table size update (6.3): only before the first field
            if fields:
                raise HPACKDecodingError("Table size update not at the start of the block")
            size = first & 0x1F
            if size == 0x1F:
                size, pos = _integer(data, pos, size)
            if size > _MAX_TABLE_SIZE_UPDATE:
                raise InvalidTableSizeError("Table size update beyond any SETTINGS value")
            table.maxsize = size
            continue
        append(field)
        inflated += 32 + len(field[0]) + len(field[1])
        if inflated > max_list:
            raise OversizedHeaderListError(f"A header list larger than {max_list}")
    return fields


# Table-dependent decoded blocks remembered per direction (see HeaderBlockDecoder).
BLOCK_CACHE_SIZE = 32
# Self-contained blocks remembered, shared by every connection (see HeaderBlockDecoder);
# only blocks up to SELF_CONTAINED_MAX_BLOCK bytes and SELF_CONTAINED_MAX_FIELDS fields
# (an entry then holds at most ~15 KiB: the block, its decoded strings, 64 tuples), so
# this holds under 8 MiB even for hostile blocks; real ones are a few hundred bytes.
SELF_CONTAINED_CACHE_SIZE = 512
SELF_CONTAINED_MAX_BLOCK = 2048
SELF_CONTAINED_MAX_FIELDS = 64
# header list limit -> {block: (fields, insertions to replay, their total entry size)}
_SELF_CONTAINED: dict[
    int, dict[bytes, tuple[list[tuple[bytes, bytes]], tuple[tuple[bytes, bytes], ...], int]]
] = {}


class HeaderBlockDecoder:
    """Decodes the header blocks of one direction, in order; see the module docstring.

    Block caches: in steady traffic most header blocks repeat byte for byte, and
    decoding them again in hpack's pure Python is most of the per-exchange cost. A
    block's decoding is the same whenever what it depends on is, so `decode` keeps the
    results of the last few blocks of two kinds, keyed by the block's bytes:

    - Self-contained blocks: no reference to a dynamic entry and no table size update
      (nginx's responses: static names, literal values, each *inserted* into the
      dynamic table every time, and the same bytes for a whole second, as the Date
      header changes once a second). Their fields do not depend on the table, and what
      they do to it is a fixed list of insertions: a hit replays those insertions
      (`_ObserverTable.add`, the same evictions and sizes as decoding would give) and
      returns the fields. Kept across table changes, and shared by all connections
      (per header list limit, the only other input of their decoding): many clients of
      one server receive the same response bytes within a second.
    - Blocks that refer to dynamic entries without changing the table (an all-indexed
      block: nghttp2's repeated requests): valid while the table is unchanged, so kept
      until any table change (insertion, reset).
    """

    __slots__ = ("_max_list", "_table", "_cache", "_cache_generation", "_self_contained")

    def __init__(self, max_header_list_size: int) -> None:
        self._max_list = max_header_list_size
        self._table = _ObserverTable()
        self._cache: dict[bytes, tuple[list[tuple[bytes, bytes]], int]] = {}
        self._cache_generation = 0
        self._self_contained = _SELF_CONTAINED.setdefault(max_header_list_size, {})

    def decode(self, block: bytes) -> tuple[list[tuple[bytes, bytes]] | None, int]:
        """-> (fields with known names as raw bytes pairs, count of unknown fields).

        None when the block does not decode at all (the table is then reset). The list
        returned may be shared with later calls: callers must not change it.
        """
        table = self._table
        known_block = self._self_contained.get(block)
        if known_block is not None:
            fields, insertions, size = known_block
            if insertions:
                table.replay(insertions, size)
            return fields, 0
        generation = table.generation
        cache = self._cache
        if self._cache_generation == generation:
            cached = cache.get(block)
            if cached is not None:
                return cached
        before = table.unknown_lookups
        dynamic_before = table.dynamic_lookups
        updates_before = table.size_updates
        added: list[tuple[bytes, bytes]] = []
        table.added = added
        try:
            fields = decode_block(block, table, self._max_list)
        except HPACKError:
            table.reset()
            return None, 0
        except (IndexError, ValueError):  # defensive: a malformed block missed above
            table.reset()
            return None, 0
        finally:
            table.added = None
        if table.dynamic_lookups == dynamic_before and table.size_updates == updates_before:
            # Self-contained (so no unknown field either): see the class docstring.
            if (len(block) <= SELF_CONTAINED_MAX_BLOCK
                    and len(fields) <= SELF_CONTAINED_MAX_FIELDS):
                contained = self._self_contained
                if len(contained) >= SELF_CONTAINED_CACHE_SIZE:
                    contained.clear()
                size = sum([32 + len(name) + len(value) for name, value in added])
                contained[block] = (fields, tuple(added), size)
            if added:
                self._invalidate()
            return fields, 0
        if table.unknown_lookups == before:
            result = (fields, 0)
        else:
            known = [f for f in fields if f[0] != UNKNOWN]
            result = (known, len(fields) - len(known))
        if table.generation != generation or self._cache_generation != generation:
            # The table changed (this block inserted entries): earlier results are stale,
            # and this block is not all-indexed, so it is not worth keeping either.
            self._invalidate()
        else:
            if len(cache) >= BLOCK_CACHE_SIZE:
                cache.clear()
            cache[block] = result  # type: ignore[assignment]
        return result  # type: ignore[return-value]

    def _invalidate(self) -> None:
        """The table changed: results that depended on its entries are stale."""
        self._cache.clear()
        self._cache_generation = self._table.generation

    def lost_block(self) -> None:
        """A header block (or part of one) was not seen: its insertions are unknown."""
        self._table.reset()

    def allow_table_size(self, size: int) -> None:
        """The decoding peer's SETTINGS_HEADER_TABLE_SIZE: the encoder may grow to it."""
        self._table.maxsize = size

    def table_bytes(self) -> int:
        return self._table._current_size
