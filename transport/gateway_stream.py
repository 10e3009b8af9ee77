"""The subscription behind the gateway's ``GET /events/stream``, handed from its thread to the event loop.

A :class:`transport.subscriber.Subscriber` blocks and its ZeroMQ socket belongs to one thread,
so each stream runs one on a thread of its own (:class:`StreamPump`). The thread takes what the
subscriber has (up to ``BATCH_EVENTS`` events at a time, or ``ITEM_BYTES`` of their text, or a
notice that retention deleted events after the cursor), writes it as the stream's text, and puts
it on an asyncio queue for the route's writer, at most ``AHEAD`` items and ``QUEUE_BYTES`` ahead
of what the writer took: a slow HTTP client holds the thread back, the thread stops taking
events, and the subscriber stops granting the daemon credit and, past ``SUBSCRIBER_BYTES``,
reading its messages. So a stream's memory is bounded in events and in bytes (about 8 MiB
whatever the events' sizes up to 1 MiB, see docs/gateway.md) whatever its client does, and the
daemon queues for it no more than for any consumer that stops reading.

The subscriber reconnects and resumes by itself when the daemon restarts, so a stream outlives a
restart. :meth:`StreamPump.stop` (the client went away, or the gateway is stopping) ends the
thread within ``POLL_S``, closing the subscriber; a subscription the daemon refuses ends it with
an ``error`` item, and so does a subscriber whose socket cannot be had at the descriptor limit
(:attr:`StreamPump.exhausted`: the route answers 503 when that happens before the stream began).

:class:`OpenStreams` counts the open streams for ``[http] max_streams`` and ``/metrics``, over
all of the gateway's worker processes when it has several.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from transport.descriptors import exhausted_message, out_of_descriptors
from transport.subscriber import Subscriber, SubscriberError, SubscriberRefused

log = logging.getLogger(__name__)

BATCH_EVENTS = 256  # most events in one item: one wake-up of the event loop per batch, not per event
ITEM_BYTES = 256 * 1024  # ... and at most this much of their text (one event at least, whatever its size)
AHEAD = 4  # items the thread may put on the queue before the writer takes one
# ... and bytes of them: the thread waits while this much waits for the writer (events of up to
# 1 MiB each would otherwise make AHEAD items of BATCH_EVENTS hundreds of MiB).
QUEUE_BYTES = 2 * 1024 * 1024
# The most bytes of the daemon's messages the stream's subscriber reads ahead of the thread
# (``Subscriber(buffer_bytes=...)``): its credit window alone, 1000 events, could be 1 GiB.
SUBSCRIBER_BYTES = 1024 * 1024
POLL_S = 0.25  # how often a waiting thread looks whether the stream was stopped
CONFIRM_POLL_S = 0.02  # ... and whether the daemon has confirmed the subscription, until it has

# ("events", the events' text), ("expired", {"after", "first"}), ("error", str), ("end", None)
Item = tuple[str, Any]

STREAMS_FOLDER_ENV = "EVENTAGG_GATEWAY_STREAMS"
"""The folder where each worker process of a gateway with ``[http] workers`` above 1 keeps its count."""


class OpenStreams:
    """How many event streams this gateway process has open, and how many all its processes have.

    One process alone counts in memory. With ``[http] workers`` above 1 the gateway command makes
    a folder for the workers (``$EVENTAGG_GATEWAY_STREAMS``) and each worker also writes its count
    to a file named by its pid there, replaced whole at each change (so a reader never sees half
    of one); :meth:`everywhere` sums the files of the workers still alive, so ``/metrics`` gives the
    gateway's figure whichever worker answers the scrape. The limit, ``[http] max_streams``, stays
    per process: each process can only refuse its own connections.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self._folder = folder
        self.here = 0

    def opened(self) -> None:
        self.here += 1
        self._publish()

    def closed(self) -> None:
        self.here -= 1
        self._publish()

    def everywhere(self) -> int:
        """This process's streams, plus those of the other live workers."""
        if self._folder is None:
            return self.here
        total = self.here
        mine = str(os.getpid())
        try:
            names = os.listdir(self._folder)
        except OSError:
            return total
        for name in names:
            if name == mine or not name.isdigit():
                continue
            try:
                os.kill(int(name), 0)
            except (ProcessLookupError, PermissionError):
                # A worker that died (its streams died with it), its pid perhaps another user's now.
                (self._folder / name).unlink(missing_ok=True)
                continue
            try:
                total += int((self._folder / name).read_text() or 0)
            except (OSError, ValueError):
                continue  # gone since listed
        return total

    def _publish(self) -> None:
        if self._folder is None:
            return
        path = self._folder / str(os.getpid())
        partial = path.with_name(f".{path.name}")
        try:
            partial.write_text(str(self.here))
            os.replace(partial, path)
        except OSError as exc:  # the folder removed under us: /metrics counts this process alone
            log.warning("could not record this worker's open event streams in %s: %s", self._folder, exc)


class StreamPump:
    """One subscription on its own thread, feeding :meth:`get` with batches of events, in order.

    ``encode`` writes one event as the stream's text: on the thread, so that what waits for the
    writer is counted in the bytes it will write (and the event loop is spared the encoding).
    """

    def __init__(
        self,
        make_subscriber: Callable[[], Subscriber],
        loop: asyncio.AbstractEventLoop,
        encode: Callable[[dict[str, Any]], bytes],
        cursor: str = "position",
    ) -> None:
        self._make_subscriber = make_subscriber
        self._loop = loop
        self._encode = encode
        self._cursor = cursor  # the event field that retention's notices count in: "seq" or "position"
        self._items: asyncio.Queue[Item] = asyncio.Queue()
        # What the thread has queued and the writer not yet taken: items, and bytes of events.
        self._drained = threading.Condition()
        self._ahead = 0
        self._queued_bytes = 0
        self._stopped = threading.Event()
        # The daemon's answer to the subscription: None once it confirmed it, or its refusal.
        self._answer: asyncio.Future[str | None] = loop.create_future()
        self._told = False  # the thread's own note that it settled ``_answer``
        # Set by the thread before it settles ``_answer`` with a refusal: no descriptor was free
        # for the subscriber's socket, so the refusal is the gateway's, not the daemon's.
        self.exhausted = False
        # Set likewise when the refusal is of the gateway's handshake (its CURVE key), not of the stream.
        self.handshake_refused = False
        self._thread = threading.Thread(target=self._run, name="event-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def answer(self, timeout: float) -> str | None:
        """Why the daemon refused the subscription, or None: it confirmed it, or has not answered
        within ``timeout`` seconds (the subscriber then goes on trying, as across a restart)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._answer), timeout)
        except TimeoutError:
            return None

    @property
    def answered(self) -> bool:
        """Whether the daemon has confirmed or refused the subscription (or the thread has ended)."""
        return self._answer.done()

    def stop(self) -> None:
        """End the subscription: the thread closes the subscriber within ``POLL_S``."""
        self._stopped.set()

    async def get(self, timeout: float) -> Item | None:
        """The next item, or None when none came within ``timeout`` seconds."""
        try:
            item = await asyncio.wait_for(self._items.get(), timeout)
        except TimeoutError:
            return None
        if item[0] in ("events", "expired"):
            with self._drained:
                self._ahead -= 1
                self._queued_bytes -= _size(item)
                self._drained.notify()
        return item

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        subscriber = None
        try:
            subscriber = self._make_subscriber()
            told = 0  # the subscriber's expired notices taken into ``notices``
            notices: list[tuple[int, int]] = []  # (after, first) not yet passed on
            batch: list[bytes] = []  # the text of the events in hand
            batch_bytes = 0
            while not self._stopped.is_set():
                # Waits only with nothing in hand; else takes what has already arrived. Until the
                # daemon confirms the subscription, in short steps: the route waits for that.
                event = subscriber.next_event(0 if batch else POLL_S if self._told else CONFIRM_POLL_S)
                if subscriber.subscribed and not self._told:
                    self._tell(None)
                notices += subscriber.expired[told:]
                told = len(subscriber.expired)
                # The subscriber reads several messages at once and keeps notices apart from
                # events: a notice goes just before the first event at or past its ``first``
                # (events before it came before it), all of them once no event is left in hand.
                due = [n for n in notices if event is None or n[1] <= event[self._cursor]]
                if due:
                    if batch:
                        item = ("events", b"".join(batch))
                        batch, batch_bytes = [], 0
                        if not self._put(item, subscriber):
                            return
                    for after, first in due:
                        if not self._put(("expired", {"after": after, "first": first}), subscriber):
                            return
                    notices = notices[len(due) :]
                if event is not None:
                    batch.append(self._encode(event))
                    batch_bytes += len(batch[-1])
                    del event  # not held while the thread waits for room
                    full = len(batch) >= BATCH_EVENTS or batch_bytes >= ITEM_BYTES
                else:
                    full = True
                if batch and full:
                    item = ("events", b"".join(batch))
                    batch, batch_bytes = [], 0  # not held twice while the thread waits for room
                    if not self._put(item, subscriber):
                        return
        except SubscriberRefused as exc:
            self.handshake_refused = True
            self._tell(str(exc))  # naming the endpoint, as the gateway's other refusals do
            self._hand(("error", str(exc)))
        except SubscriberError as exc:
            self._tell(exc.reason)  # refused before the stream began: the route answers it as an error
            self._hand(("error", str(exc)))
        except Exception as exc:  # a stream must end with a word, not hang its client
            if out_of_descriptors(exc):  # the limit: said in the log by the gateway's watch, no traceback
                message = exhausted_message("the gateway", "open a subscription to the daemon for the stream")
                log.warning("an event stream could not go on: %s", message)
                self.exhausted = True
                self._tell(message)
                self._hand(("error", message))
                return
            log.exception("an event stream failed")
            self._hand(("error", f"the gateway's subscription failed: {type(exc).__name__}: {exc}"))
        finally:
            if subscriber is not None:
                subscriber.close()
            self._tell(None)
            self._hand(("end", None))

    def _tell(self, refusal: str | None) -> None:
        """Settle :meth:`answer` (the first call only)."""
        if self._told:
            return
        self._told = True

        def settle() -> None:
            if not self._answer.done():
                self._answer.set_result(refusal)

        with contextlib.suppress(RuntimeError):  # the event loop is closed: the gateway has stopped
            self._loop.call_soon_threadsafe(settle)

    def _put(self, item: Item, subscriber: Subscriber) -> bool:
        """Queue ``item`` once the writer has room for it; False when the stream was stopped first.

        Room: fewer than ``AHEAD`` items and ``QUEUE_BYTES`` queued (so one item at least, however
        large). Waiting on a client that reads slowly can outlast the daemon's ``[subscribe]
        timeout_ms``: the subscription is kept alive meanwhile, or the daemon drops it and it
        starts over.
        """
        while True:
            with self._drained:
                if self._ahead < AHEAD and self._queued_bytes < QUEUE_BYTES:
                    self._ahead += 1
                    self._queued_bytes += _size(item)
                    break
                self._drained.wait(POLL_S)
            if self._stopped.is_set():
                return False
            subscriber.keep_alive()
        return self._hand(item) and not self._stopped.is_set()

    def _hand(self, item: Item) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the gateway has stopped
            return False
        return True


def _size(item: Item) -> int:
    """The bytes of text an item holds, as counted against ``QUEUE_BYTES``."""
    return len(item[1]) if item[0] == "events" else 0


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that calls ``on_close`` however it ends.

    Also when its body never began (the client went away first), which a ``finally`` in the body
    cannot see. No-cache and ``X-Accel-Buffering: no`` tell proxies to pass each event on at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None] = lambda: None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as exc:
            if not _client_gone(exc):
                raise
            log.info("an event stream's client went away: %s", exc)  # a write to a closed connection
        finally:
            # The body's own ``finally`` (which stops its subscription) runs now, not whenever the
            # generator is collected, however the response ended.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("closing an event stream's body failed")
            self._on_close()


def _client_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception of a group) is a write to a connection already closed."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_gone(inner) for inner in exc.exceptions)
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "closed" in str(exc).lower())
