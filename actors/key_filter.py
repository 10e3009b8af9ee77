"""The key filter: a bit per hash of every stored key, so that lookups of new keys skip the database.

Most keys the ordering actors ask about are new, and finding that out in SQLite costs the
writer about 1.3 µs a key (binding it, and a primary-key search that finds nothing). The filter
answers "certainly not stored" from memory for most of them: each key that is or was stored
(written, committed or only held for the next commit, or kept after expiry in
``deleted_keys``) has set the bit that its hash selects, so a key whose bit is clear was never
stored. Keys whose bit is set (the stored ones, and about one new key in sixteen that shares a
bit with another) are looked up as before. A filter can only err towards a lookup, never
towards calling a stored key new.

Python's own ``hash()`` of the ``(topic, event_id)`` tuple selects the bit: it is salted per
process, which is fine for a filter that lives and dies with the process, and it is computed in
C from the strings' cached hashes. One bit per key, sixteen bits of room per key.

A filter must hold every key stored before it was made, so one made over a database that already
holds events is not used until :class:`FilterBuild` has read them all (the dedup actor runs its
chunks between commits, as it does expiry). The dedup actor adds every key it writes to the
filter, and to the one being built, from the moment each exists. When more keys have been added
than the filter has room for, a filter twice as large is built beside it, up to ``max_bytes``;
beyond that one stays in use and lets more new keys through to the database.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.store import EventStore

Key = tuple[str, str]

BITS_PER_KEY = 16
MIN_KEYS = 1 << 20  # the smallest filter: 2 MiB, room for 1 048 576 keys
# Keys read from the database per chunk of a build: about 2-4 ms of the writer's time each.
BUILD_CHUNK = 4096


class KeyFilter:
    """A bit array over the hashes of keys: ``may_hold`` is True for every key added."""

    def __init__(self, keys: int, max_bytes: int, min_keys: int = MIN_KEYS) -> None:
        """Room for at least ``keys`` keys (and ``min_keys``), in at most ``max_bytes`` bytes."""
        size = max(keys, min_keys, 1) * BITS_PER_KEY
        bits = 1 << (size - 1).bit_length()
        while bits > 8 and bits // 8 > max_bytes:
            bits //= 2
        self._bits = bytearray(bits // 8)
        self._mask = bits - 1
        self.room = bits // BITS_PER_KEY
        self.added = 0  # keys added, with repeats: what decides that a larger filter is due

    @property
    def size_bytes(self) -> int:
        return len(self._bits)

    def add(self, keys: Iterable[Key]) -> None:
        """Set the bit of each key."""
        bits = self._bits
        mask = self._mask
        count = 0
        for key in keys:
            slot = hash(key) & mask
            bits[slot >> 3] |= 1 << (slot & 7)
            count += 1
        self.added += count

    def may_hold(self, keys: Sequence[Key]) -> list[Key]:
        """The keys that may have been added: all those that were, and a few that were not."""
        bits = self._bits
        mask = self._mask
        return [key for key in keys if bits[(slot := hash(key) & mask) >> 3] >> (slot & 7) & 1]

    def crowded(self) -> bool:
        """More keys added than it has room for: new keys get through to the database more often."""
        return self.added > self.room


class FilterBuild:
    """Fills a new filter with the keys already in the database, one chunk per step.

    ``events`` is read in rowid order up to the last rowid at the start, then ``deleted_keys`` in
    key order. Rows written after the start are added by the writer itself. A key that expiry
    moves from an ``events`` row not read yet to ``deleted_keys`` is read there, since that
    table is read last; one forgotten meanwhile may be missed, as it is no longer stored.
    """

    def __init__(self, store: EventStore, target: KeyFilter, chunk: int = BUILD_CHUNK) -> None:
        self.filter = target
        self._store = store
        self._chunk = chunk
        self._steps = self._chunks(store.last_rowid())

    def step(self) -> bool:
        """Read one chunk; False once every key has been read (the filter is complete)."""
        return next(self._steps, False)

    def _chunks(self, last_rowid: int) -> Iterator[bool]:
        after = 0
        while after < last_rowid:
            keys, after_next = self._store.stored_keys_after(after, last_rowid, self._chunk)
            if after_next is None:
                break
            self.filter.add(keys)
            after = after_next
            yield True
        last_key = ("", "")  # below every key: a topic is never empty
        while keys := self._store.kept_keys_after(last_key, self._chunk):
            self.filter.add(keys)
            # Python orders str by code point, SQLite's BINARY collation by UTF-8 bytes: the same order.
            last_key = max(keys)
            yield True
