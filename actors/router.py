"""The router actor: splits each batch by topic and hands each share to the ordering actor that owns it.

Ownership is a stable hash of the topic (CRC-32 of its UTF-8 bytes, not Python's salted
``hash()``) modulo the number of ordering actors, so a topic has the same owner in every run
and every process, and exactly one owner at a time.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

import pykka

from actors.messages import AckTicket, Freeze, IngestBatch, OrderingBatch, Ping
from transport.schema import Event

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
        count = len(self._ordering)
        owners = self._owners
        if len(owners) > _OWNER_CACHE_LIMIT:
            owners.clear()
        shares: dict[int, tuple[list[Event], list[AckTicket | None]]] = {}
        tickets = batch.tickets
        for position, event in enumerate(batch.events):
            owner = owners.get(event.topic)
            if owner is None:
                owner = owners[event.topic] = owner_of(event.topic, count)
            share = shares.get(owner)
            if share is None:
                share = shares[owner] = ([], [])
            share[0].append(event)
            if tickets is not None:
                share[1].append(tickets[position])
        for owner, (events, share_tickets) in shares.items():
            self._ordering[owner].tell(
                OrderingBatch(events, batch.received_at, share_tickets if tickets is not None else None)
            )
