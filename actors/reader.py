"""The reader actor: answers ``events``, ``topics`` and ``consumers`` queries on a thread of its own.

Why apart from the stats actor: a page of events can be large and slow to read, and while
one actor reads it, everything else queued for that actor waits. ``stats`` and ``health`` (and
the systemd watchdog, which pings through the stats actor) must never wait behind a page, so
the stats actor answers only those and this actor everything that reads events or topics.

A page of events is packed here straight into the msgpack reply, with each payload copied as
the bytes stored (it is already the msgpack of the payload map): nothing is unpacked and packed
again, so a page costs about its own size in memory and time, whatever its payloads hold. A
page stops at ``limit`` events or once it holds ``max_page_bytes``, whichever comes first, and
always holds at least one event, so a client paging with ``next`` always gets on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import pykka

from actors.messages import Freeze, Ping, QueryRequest
from actors.stats import answer_request, topics_page
from actors.store import EventReader
from transport.queries import ConsumersQuery, EventsQuery, TopicsQuery

log = logging.getLogger(__name__)

# Every field of an event in a reply but its payload, at most: seven keys, names of up to 255
# characters (4 bytes each in UTF-8), integers and a bool.
_EVENT_OVERHEAD = 64


class PackedReply(bytes):
    """A reply already packed as msgpack: the query server sends it as it is."""


def pack_events_page(
    rows: Any, after: int, max_bytes: int, first: Callable[[], int], with_position: bool = False
) -> PackedReply:
    """``{"events": [...], "next": N, "first": F}`` from :meth:`EventReader.event_rows`, payloads
    passed through; ``with_position`` (a page of all topics) gives each event its commit
    ``position``, the cursor to carry on after it. ``first()`` (:meth:`EventReader.first`) is
    asked once the page is read, so an expiry that took events before the page is always shown.

    Reads rows until the page would pass ``max_bytes`` (always taking the first one).
    """
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    chunks: list[bytes] = []
    size = 0
    position = after
    for row_position, topic, event_id, timestamp, source, payload, seq, late in rows:
        packer.reset()
        packer.pack_map_header(8 if with_position else 7)
        for key, value in (("topic", topic), ("event_id", event_id), ("timestamp", timestamp), ("source", source)):
            packer.pack(key)
            packer.pack(value)
        if with_position:
            packer.pack("position")
            packer.pack(row_position)
        packer.pack("seq")
        packer.pack(seq)
        packer.pack("late")
        packer.pack(bool(late))
        packer.pack("payload")
        head = packer.bytes()
        if chunks and size + len(head) + len(payload) > max_bytes:
            break
        chunks.append(head)
        chunks.append(bytes(payload))
        size += len(head) + len(payload)
        position = row_position
    events = len(chunks) // 2
    packer.reset()
    packer.pack_map_header(3)
    packer.pack("events")
    packer.pack_array_header(events)
    head = packer.bytes()
    packer.reset()
    packer.pack("next")
    packer.pack(position)
    packer.pack("first")
    packer.pack(first())
    return PackedReply(b"".join([head, *chunks, packer.bytes()]))


def pack_listing(key: str, items: Iterable[Any]) -> PackedReply:
    """``{key: [items...]}`` packed one item at a time, so only the packed reply is held whole.

    The array's length is known last: its header is a 32-bit one (msgpack readers take any
    width), written in place once the items are counted.
    """
    packer = msgpack.Packer(use_bin_type=True)
    out = bytearray(packer.pack_map_header(1) + packer.pack(key) + b"\xdd\0\0\0\0")
    length_at = len(out) - 4
    count = 0
    for item in items:
        out += packer.pack(item)
        count += 1
    out[length_at : length_at + 4] = count.to_bytes(4, "big")
    return PackedReply(out)


class ReaderActor(pykka.ThreadingActor):
    """Answers :class:`QueryRequest` for events and topics from a read-only connection of its own."""

    def __init__(self, path: Path, max_page_bytes: int) -> None:
        super().__init__()
        self._path = path
        self._max_page_bytes = max_page_bytes
        self._reader: EventReader | None = None

    def on_start(self) -> None:
        self._reader = EventReader(self._path)

    def on_stop(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, QueryRequest):
            answer_request(message, self.answer)
            return None
        if isinstance(message, Ping):
            return True
        if isinstance(message, Freeze):
            time.sleep(message.seconds)
            return None
        return self.answer(message)

    def answer(self, query: Any) -> dict[str, Any] | PackedReply:
        """The reply to an events or topics query."""
        assert self._reader is not None
        if isinstance(query, EventsQuery):
            reader, topic = self._reader, query.topic
            rows = reader.event_rows(topic, query.after, query.limit)
            try:
                return pack_events_page(
                    rows, query.after, self._max_page_bytes, lambda: reader.first(topic), with_position=topic is None
                )
            finally:
                rows.close()
        if isinstance(query, TopicsQuery):
            if query.after is not None:  # a page (the parser sets limit with it)
                return topics_page(self._reader.topics(query.after, query.limit), query.after)
            # Packed here, not on the query thread, and a topic at a time: 100 000 topics are 9 MB
            # of reply, and held as maps first they took 56 MB more.
            return pack_listing("topics", self._reader.each_topic())
        if isinstance(query, ConsumersQuery):
            return {"consumers": self._reader.consumers()}
        return {"error": f"unsupported query {query!r}"}
