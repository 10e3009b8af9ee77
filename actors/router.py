"""The router actor: splits each batch by topic and hands each share to the ordering actor that owns it.

Ownership is a stable hash of the topic (CRC-32 of its UTF-8 bytes, not Python's salted
``hash()``) modulo the number of ordering actors, so a topic has the same owner in every run
and every process, and exactly one owner at a time.
"""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from typing import Any

import pykka

from actors.messages import Freeze, IngestBatch, OrderingBatch, Ping
from actors.reorder import pick
from transport.schema import topic_of

log = logging.getLogger(__name__)

_OWNER_CACHE_LIMIT = 1_000_000


def owner_of(topic: str, actors: int) -> int:
    """The index of the ordering actor that owns ``topic``."""
    return zlib.crc32(topic.encode("utf-8")) % actors


class RouterActor(pykka.ThreadingActor):
    """Routes ingest batches to ordering actors by topic."""

    def __init__(self, ordering: list[pykka.ActorRef[Any]]) -> None:
        super().__init__()
        self._ordering = ordering
        self._owners: dict[str, int] = {}

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, IngestBatch):
            self._route(message)
        elif isinstance(message, Ping):
            return True
        elif isinstance(message, Freeze):
            time.sleep(message.seconds)
        else:
            log.error("router got an unknown message %r", message)
        return None

    def _route(self, batch: IngestBatch) -> None:
        ordering = self._ordering
        if len(ordering) == 1:  # the default: one owner of every topic, so the batch goes on whole
            ordering[0].tell(OrderingBatch(batch.events, batch.received_at, batch.tickets))
            return
        owners = self._owners
        if len(owners) > _OWNER_CACHE_LIMIT:
            owners.clear()
        count = len(ordering)
        topics = list(map(topic_of, batch.events))
        column = [owners.get(topic, -1) for topic in topics]
        if -1 in column:  # topics not seen yet (or since the cache was cleared)
            for topic in set(itertools.compress(topics, map((-1).__eq__, column))):
                owners[topic] = owner_of(topic, count)
            column = list(map(owners.__getitem__, topics))
        if not column:
            return
        first = column[0]
        if column.count(first) == len(column):  # one owner for the whole batch: no split
            ordering[first].tell(OrderingBatch(batch.events, batch.received_at, batch.tickets))
            return
        tickets = batch.tickets
        for owner in sorted(set(column)):
            positions = [position for position, of in enumerate(column) if of == owner]
            ordering[owner].tell(
                OrderingBatch(
                    pick(batch.events, positions),
                    batch.received_at,
                    pick(tickets, positions) if tickets is not None else None,
                )
            )
