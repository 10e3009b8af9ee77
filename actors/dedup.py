"""The dedup actor: the only owner of the SQLite write connection, and where duplicates are found.

Ordering actors ask it which event ids are new, then tell it the rows to write. Lookups that
arrive together (typically one from each ordering actor for the same ingest batch) are
answered together, in one statement, once one has come from every ordering actor or the inbox
runs dry. Writes are held until the inbox runs dry, ``commit_max_events`` events are waiting
or ``commit_max_ms`` has passed; then all their rows are inserted, their counts added and the
transaction committed (group commit). Until then a held row's key counts as present to every
lookup, from memory. Only after COMMIT returns does it count the events as processed: it
publishes the new counters, answers the acknowledged batches the commit completed and gives
the in-flight credit back. Counters are written in the same transaction as the rows, so they
survive restarts and agree with the rows after a crash.

Why hold lookups and rows: every statement drops the GIL around ``sqlite3_step``, and winning
it back from the busy ingest and ordering threads cost this thread 1-3 ms a statement, more
than most statements' own work. Per 200 000 events that was about 400 lookups and 1 200
inserts; grouped, it is about 110 and 320.

A failed commit (disk full, I/O error) is rolled back; its writes are kept and retried with
backoff, their ids still count as present so no retry can store an event twice, and no
acknowledgement is sent until they commit.

A lookup answers each key found in ``events`` with its stored content (small payloads only), so
the ordering actor settles an exact re-send then and there. The other duplicates ride along in
the writes; inside each commit's transaction they are compared with their stored originals
(bytes first, fingerprints only when the bytes differ), and those whose content differs are
counted as conflicting, logged, and named in their batches' acks.

Retention ([retention], docs/retention.md) runs here too, since this is the only writer: every
``sweep_interval`` a sweep starts, and it goes in chunks of at most ``EXPIRE_CHUNK`` rows, each
its own short transaction, taken only between group commits, so ingest never waits for more
than one chunk.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pykka
import zmq

from actors.flow import InFlight, LiveFigures
from actors.messages import (
    AckTicket,
    AddRejected,
    ClassifyRequest,
    ClassifyResult,
    Freeze,
    Ping,
    PositionsSaved,
    SaveConsumerPositions,
    Sync,
    Tick,
    WriteBatch,
)
from actors.store import (
    COUNTER_NAMES,
    DEFAULT_CACHE_MB,
    Checkpointer,
    DatabaseLock,
    EventStore,
    Row,
    StorageError,
    StoredContents,
    TopicDelta,
    connect_writer,
    row_content,
)
from transport.backoff import Backoff
from transport.config import RetentionConfig
from transport.logs import RateLimitedLog
from transport.schema import Event

log = logging.getLogger(__name__)

ACK_ENDPOINT = "inproc://eventagg-acks"

# Pauses between attempts at a failed write: 0.1 s doubling to 5 s. No jitter: one writer.
STORAGE_RETRY = Backoff(base=0.1, factor=2.0, cap=5.0, jitter=0.0)

_row_key = operator.itemgetter(0, 1)  # a row's (topic, event_id)

# Rows one expiry chunk deletes at most. Each is fingerprinted (~3 us), its key recorded and its
# row deleted from the table and two indexes, which costs the writer about what inserting it did
# (10-30 us on a loaded machine); the chunk size adapts between these bounds so that a chunk
# holds the writer for about EXPIRE_CHUNK_S, a fraction of a group commit's time.
EXPIRE_CHUNK = 500
EXPIRE_CHUNK_MIN = 32
EXPIRE_CHUNK_S = 0.005
# While messages keep coming, a chunk still runs after this long without one.
EXPIRE_FORCE_S = 0.02


class DedupActor(pykka.ThreadingActor):
    """Owns the database; classifies ids as new or duplicate; writes and commits in groups."""

    # A held row is stored exactly as held (this actor is the only writer), so its content may
    # settle its re-sends before it commits.
    held_rows_are_stored_as_held = True

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str,
        commit_max_events: int,
        commit_max_ms: int,
        cache_mb: int = DEFAULT_CACHE_MB,
        lookup_group: int = 1,
        retention: RetentionConfig | None = None,
        in_flight: InFlight,
        live: LiveFigures,
        zmq_context: zmq.Context[Any],
        head_moved: Callable[[], None] | None = None,
    ) -> None:
        """``head_moved`` is called after every COMMIT that stored events (the subscriptions' wake-up)."""
        super().__init__()
        self._head_moved = head_moved
        self._path = path
        self._synchronous = synchronous
        self._cache_mb = cache_mb
        self._commit_max_events = commit_max_events
        self._commit_max_s = commit_max_ms / 1000
        self._in_flight = in_flight
        self._live = live
        self._zmq_context = zmq_context
        self._store: EventStore | None = None
        self._lock = DatabaseLock(path)
        self._checkpointer: Checkpointer | None = None
        self._acks: zmq.Socket[Any] | None = None
        self._lookup_group = lookup_group  # told lookups held until this many wait (or the inbox is empty)
        self._lookups: list[ClassifyRequest] = []
        self._writes: list[WriteBatch] = []
        self._rejected = 0
        self._rejected_replies: list[list[bytes]] = []  # sent once the commit counting them is done
        self._txn_events = 0
        self._txn_started = 0.0
        self._held: dict[tuple[str, str], Row] = {}  # the rows in self._writes, by key
        self._retry_at = 0.0
        self._failures = 0
        self._counters: dict[str, int] = {}
        self._startup_error: StorageError | None = None
        self._warn = RateLimitedLog(log)
        self._retention = retention if retention is not None and retention.enabled else None
        self._next_sweep = 0.0  # first sweep right after start
        self._sweep: Iterator[None] | None = None  # the sweep under way, one chunk per step
        self._touched: set[str] | None = None  # topics written since the last sweep; None: all
        self._chunk = EXPIRE_CHUNK_MIN  # rows per expiry chunk, adapted to take about EXPIRE_CHUNK_S
        self._last_chunk = 0.0
        self._budget_unmet = False  # max_bytes was said to be unmet, and has not been met since
        self._syncing = False  # inside a Sync (the daemon's drain), which retries a failed commit itself

    def on_start(self) -> None:
        # The connection is opened here, on the actor's own thread, never in __init__.
        try:
            self._lock.acquire()  # first: a second daemon must not even create the schema
            self._store = EventStore(connect_writer(self._path, self._synchronous, self._cache_mb))
        except StorageError as exc:
            self._lock.release()
            # Raised here it would only kill the actor behind a pykka traceback; kept, it is
            # the answer to the supervisor's start-up Ping, which stops with this message.
            self._startup_error = exc
            return
        self._counters = self._store.counters()
        self._live.committed = dict(self._counters)
        self._checkpointer = Checkpointer(self._path, on_outcome=self._note_checkpoint)
        self._checkpointer.start()
        self._acks = self._zmq_context.socket(zmq.PUSH)
        self._acks.setsockopt(zmq.LINGER, 0)
        self._acks.connect(ACK_ENDPOINT)

    def _note_checkpoint(self, error: str | None) -> None:
        self._live.checkpoint_error = error

    def on_stop(self) -> None:
        self._answer_lookups()
        self._commit()
        self._close()

    def on_failure(self, *args: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self._lock.release()
        if self._acks is not None:
            self._acks.close(linger=1000)
            self._acks = None

    def on_receive(self, message: Any) -> Any:
        try:
            return self._handle(message)
        finally:
            if self._lookups and (len(self._lookups) >= self._lookup_group or self.actor_inbox.empty()):
                self._answer_lookups()
            if self._writes or self._rejected:
                self._maybe_commit()
            # A failed start: the actor is stopping, and a sweep would only trip on the missing store.
            if (
                self._startup_error is None
                and self._retention is not None
                and not (self._writes or self._rejected or self._failures)
            ):
                self._sweep_step()

    def _handle(self, message: Any) -> Any:
        if isinstance(message, ClassifyRequest):
            if message.reply_to is None:
                return self._classify(message.keys, message.unknown_topics, message.keys_json)
            self._lookups.append(message)
            return None
        if isinstance(message, WriteBatch):
            self._write(message)
        elif isinstance(message, AddRejected):
            self._open_group()
            self._rejected += message.count
            self._rejected_replies.extend(message.replies)
        elif isinstance(message, Sync):
            self._syncing = True  # a failure now is retried at the drain's next Sync, not by the back-off
            try:
                self._commit()
            finally:
                self._syncing = False
            return not self._writes
        elif isinstance(message, Ping):
            # Answered, not raised: pykka would log a raised one with its traceback, above the
            # one line that says why the daemon cannot start.
            return self._startup_error if self._startup_error is not None else self._store is not None
        elif isinstance(message, Tick):
            # A chance to retry a failed commit (_maybe_commit runs after every message), and to
            # notice a deleted database while idle.
            self._check_database()
        elif isinstance(message, SaveConsumerPositions):
            return self._save_positions(message)
        elif isinstance(message, Freeze):
            time.sleep(message.seconds)
        else:
            log.error("dedup actor got an unknown message %r", message)
        return None

    def _classify(
        self, keys: list[tuple[str, str]], unknown_topics: list[str], keys_json: str | None = None
    ) -> ClassifyResult:
        assert self._store is not None
        existing, contents = self._store.lookup(keys, keys_json)
        self._add_held(keys, existing, contents)
        states = self._store.topic_states(unknown_topics) if unknown_topics else {}
        return ClassifyResult(existing, states, contents=contents)

    def _add_held(self, keys: list[tuple[str, str]], existing: set[tuple[str, str]], contents: StoredContents) -> None:
        """Count the asked keys of rows held for the next commit as stored, with those rows' content.

        With the content, an exact re-send of a held event is settled by its ordering actor at
        once, as one of a stored event is; without it, each went to the content check at commit,
        a statement and a read of a random row for ~9 % of bench.py's re-sends. Only where held
        rows are stored as held (:attr:`held_rows_are_stored_as_held`: not on PostgreSQL).
        """
        held = self._held
        if not held:
            return
        found = held.keys() & keys
        existing.update(found)
        if self.held_rows_are_stored_as_held:
            for key in found:
                contents[key] = row_content(held[key])

    def _answer_lookups(self) -> None:
        """Answer the held lookups with one lookup of all their keys.

        Each asker gets the same ``existing`` set (keys of other actors' topics never match its
        own) but only the states of the topics it asked about.
        """
        requests, self._lookups = self._lookups, []
        if not requests:
            return
        if len(requests) == 1:
            keys, unknown, keys_json = requests[0].keys, requests[0].unknown_topics, requests[0].keys_json
        else:
            keys = list(itertools.chain.from_iterable(request.keys for request in requests))
            unknown = list(itertools.chain.from_iterable(request.unknown_topics for request in requests))
            keys_json = _joined_json_arrays([request.keys_json for request in requests])
        try:
            found = self._classify(keys, unknown, keys_json)
        except Exception as exc:
            log.exception("looking up %d keys failed", len(keys))
            answers = [ClassifyResult(set(), {}, token=request.token, error=str(exc)) for request in requests]
        else:
            answers = []
            for request in requests:
                states = found.states
                if len(requests) > 1 and states:
                    states = {topic: states[topic] for topic in request.unknown_topics}
                answers.append(ClassifyResult(found.existing, states, token=request.token, contents=found.contents))
        for request, answer in zip(requests, answers):
            try:
                request.reply_to.tell(answer)
            except pykka.ActorDeadError:
                pass  # stopped while it waited (at shutdown): nobody needs the answer

    def _save_positions(self, message: SaveConsumerPositions) -> PositionsSaved:
        """Between commits: commit what is held, then the positions in a transaction of their own."""
        assert self._store is not None
        self._commit()
        try:
            self._store.begin()
            self._store.save_consumer_positions(message.positions, time.time())
            self._store.commit()
        except sqlite3.Error as exc:
            self._store.rollback()
            return PositionsSaved(error=f"storing consumer positions failed: {exc}")
        return PositionsSaved()

    def _open_group(self) -> None:
        """Start the group commit's clock if nothing is held yet: it commits ``commit_max_ms`` later at most."""
        if not self._writes and not self._rejected:
            self._txn_started = time.monotonic()

    def _write(self, write: WriteBatch) -> None:
        self._open_group()
        self._writes.append(write)
        self._held.update(zip(map(_row_key, write.rows), write.rows))
        self._txn_events += write.events

    def _maybe_commit(self) -> None:
        now = time.monotonic()
        if self._failures:
            if now >= self._retry_at:
                self._commit()
            return
        if (
            self.actor_inbox.empty()
            or self._txn_events >= self._commit_max_events
            or now - self._txn_started >= self._commit_max_s
        ):
            self._commit()

    def _commit(self) -> None:
        """Commit the open group of writes, then publish counters, send acks and release credit."""
        store = self._store
        if store is None or (not self._writes and not self._rejected) or self._live.fatal is not None:
            return
        self._answer_lookups()  # first: the askers work on while this commit runs
        writes = self._writes
        totals = dict.fromkeys(COUNTER_NAMES, 0)
        topics: dict[str, TopicDelta] = {}
        for write in writes:
            totals["received"] += write.events
            totals["unique_processed"] += len(write.rows)
            totals["duplicate_dropped"] += write.events - len(write.rows)
            totals["late"] += write.late
            # The writes' own deltas are shared, never changed: should this commit fail, the
            # retry sums the same writes again. Only topics in more than one write are summed
            # here (with many topics, few are), the rest are taken over in C.
            common = topics.keys() & write.topics.keys()
            summed = {topic: _sum_deltas(topics[topic], write.topics[topic]) for topic in common}
            topics.update(write.topics)
            topics.update(summed)
        totals["rejected"] = self._rejected
        totals["stored"] = totals["unique_processed"]
        duplicates = list(itertools.chain.from_iterable(write.duplicates for write in writes))
        conflicting: list[int] = []
        try:
            store.begin()
            store.insert(list(itertools.chain.from_iterable(write.rows for write in writes)))
            if duplicates:
                # After the insert: an original written in this very commit is compared too.
                conflicting = self._conflicting(store, duplicates)
                if conflicting:
                    totals["conflicting_duplicates"] = len(conflicting)
                    store.add_conflicts(_per_topic(duplicates[position][0].topic for position in conflicting))
            store.add_counts(topics, totals)
            store.commit()
        except sqlite3.Error as exc:
            self._fail(exc)
            return
        if not self._check_database():
            return  # committed into a file that is gone: acknowledge nothing, keep it all held
        for position in conflicting:
            event, ticket = duplicates[position]
            self._warn.warning(
                "conflicting duplicate: topic %r event_id %r was re-sent with different content; the first stored"
                " version is kept (a publisher reuses event ids)",
                event.topic,
                event.event_id,
            )
            if ticket is not None:
                ticket.conflicting.append(event)
        if self._touched is not None:
            self._touched.update(topics)
        if self._failures:
            log.warning("commit succeeded again after a failure; %d events stored", totals["unique_processed"])
        self._held = {}
        self._failures = 0
        self._live.last_commit_error = None
        self._writes = []
        self._rejected = 0
        self._txn_events = 0
        replies, self._rejected_replies = self._rejected_replies, []
        self._after_commit(writes, totals, replies)

    @staticmethod
    def _conflicting(store: EventStore, duplicates: list[tuple[Event, AckTicket | None]]) -> list[int]:
        """Which duplicates conflict with their originals; a bug here must not cost the commit."""
        try:
            return store.conflicting([event for event, _ticket in duplicates])
        except sqlite3.Error:
            raise  # the commit fails and is retried, like any other statement of it
        except Exception:
            log.exception(
                "comparing %d duplicates with their originals failed; none counted as conflicting", len(duplicates)
            )
            return []

    def _sweep_step(self) -> None:
        """Run one chunk of the sweep under way, or start one when it is due.

        A chunk runs when nothing waits in the inbox, so lookups and writes never queue behind
        one; under a load that leaves no such gap, one still runs every EXPIRE_FORCE_S, so
        expiry keeps going at full rate.
        """
        now = time.monotonic()
        if self._sweep is None:
            if now < self._next_sweep:
                return
            assert self._retention is not None
            self._next_sweep = now + self._retention.sweep_interval_s
            self._sweep = self._sweep_chunks(self._retention)
        if not self.actor_inbox.empty() and now - self._last_chunk < EXPIRE_FORCE_S:
            return
        self._last_chunk = now
        try:
            next(self._sweep)
        except StopIteration:
            self._sweep = None
            self._live.sweep_error = None
            return
        except (sqlite3.Error, StorageError) as exc:
            self._sweep = None
            self._live.sweep_error = f"retention's sweep failed: {exc}"
            log.error(
                "expiry failed (%s); it runs again in %s", exc, self._retention and self._retention.sweep_interval
            )
            return
        except Exception as exc:  # a bug must not stop the writer: log it, and try again next sweep
            self._sweep = None
            self._live.sweep_error = f"retention's sweep failed: {exc!r}"
            log.exception("expiry failed; it runs again at the next sweep")
            return
        if self.actor_inbox.empty():
            self.actor_ref.tell(Tick())  # more to do: come back once whatever arrives meanwhile is handled

    def _sweep_chunks(self, retention: RetentionConfig) -> Iterator[None]:
        """One sweep: every limit in turn, one transaction of at most EXPIRE_CHUNK rows per step."""
        max_age = retention.max_age_s
        if max_age is not None:
            received_before = time.time() - max_age
            # Until a chunk finds nothing old enough (one that comes back short may only have
            # skipped the commit-position mark).
            while self._expire(EventStore.expire_oldest, received_before, self._chunk):
                yield
        if retention.max_events_per_topic:
            keep = retention.max_events_per_topic
            touched, self._touched = self._touched, set()
            trimmed = False
            try:
                assert self._store is not None
                over = self._store.topics_over(keep, touched)
                for topic, excess in over:
                    yield from self._in_chunks(
                        functools.partial(self._expire, EventStore.expire_topic_oldest, topic), excess
                    )
                trimmed = True
            finally:
                if not trimmed:  # failed or dropped: the next sweep looks at these topics again
                    self._touched = None if touched is None or self._touched is None else self._touched | touched
        budget = retention.max_bytes_value
        if budget is not None:
            assert self._store is not None
            used = self._store.used_bytes()
            stored = self._counters.get("stored", 0)
            if used > budget and stored:
                # Pages are freed whole, so deleting a share of the events frees about that share.
                doomed = min(stored, -(-(used - budget) * stored // used))
                yield from self._in_chunks(functools.partial(self._expire, EventStore.expire_oldest, None), doomed)
            self._note_budget(retention, self._store.used_bytes(), self._counters.get("stored", 0))
        horizon = retention.dedup_horizon_s
        if horizon is not None:
            committed_before = time.time() - horizon
            while self._forget(committed_before) == EXPIRE_CHUNK:
                yield

    def _in_chunks(self, expire: Callable[[int], int], count: int) -> Iterator[None]:
        """Delete ``count`` events by ``expire(rows)``, one chunk of at most ``self._chunk`` rows a
        step. A chunk may delete fewer than asked (its payload bytes are bounded too): what it did
        delete is counted, and a chunk that deletes none ends it."""
        while count > 0:
            deleted = expire(min(count, self._chunk))
            if not deleted:
                return
            count -= deleted
            yield

    def _note_budget(self, retention: RetentionConfig, used: int, stored: int) -> None:
        """Warn once (until it is met again) when the size budget cannot be met by deleting events."""
        budget = retention.max_bytes_value
        if budget is None or used <= budget:
            self._budget_unmet = False  # met: a later miss is news again
            return
        # Over with events still stored is not news: an event that arrived since is deleted at
        # the next sweep, and the budget is still not met.
        if stored <= 0 and not self._budget_unmet:
            log.warning(
                "[retention] max_bytes %r cannot be met: with no event left stored the database still holds %d"
                " bytes (its tables, and the records of deleted events' keys that dedup_horizon keeps), so each"
                " event is deleted at the first sweep after its commit; raise max_bytes, or set a dedup_horizon",
                retention.max_bytes,
                used,
            )
            self._budget_unmet = True

    def _expire(self, delete: Callable[..., int], *args: Any) -> int:
        """Run one expiry chunk, ``delete(store, *args)``, in a transaction of its own and publish
        the counters it changed."""
        store = self._store
        assert store is not None
        started = time.monotonic()
        store.begin()
        try:
            deleted = delete(store, *args)
            store.commit()
        except BaseException:  # any failure, not only SQLite's: an open transaction blocks every later write
            store.rollback()
            raise
        self._count_expired(deleted, time.monotonic() - started)
        return deleted

    def _count_expired(self, deleted: int, took: float) -> None:
        """After an expiry chunk: size the next chunk to take about EXPIRE_CHUNK_S, and publish
        the counters it changed."""
        if deleted >= self._chunk // 2:  # a full-ish chunk: time it and size the next one
            wanted = int(self._chunk * EXPIRE_CHUNK_S / max(took, 1e-4))
            self._chunk = max(EXPIRE_CHUNK_MIN, min(EXPIRE_CHUNK, wanted, self._chunk * 2))
        if deleted:
            self._counters["expired"] += deleted
            self._counters["stored"] -= deleted
            self._live.committed = dict(self._counters)

    def _forget(self, committed_before: float) -> int:
        store = self._store
        assert store is not None
        store.begin()
        try:
            forgotten = store.forget_keys(committed_before, EXPIRE_CHUNK)
            store.commit()
        except BaseException:  # as in _expire: never leave the transaction open
            store.rollback()
            raise
        return forgotten

    def _check_database(self) -> bool:
        """True while the database's path still leads to the file written; else stop for good.

        Checked after every commit, before its acknowledgements: writes to a deleted or replaced
        file succeed and are lost with it, so from then on nothing is committed or acknowledged,
        and the daemon (which watches ``live.fatal``) reports it and exits non-zero.
        """
        if self._live.fatal is not None:
            return False
        problem = self._lock.replaced()
        if problem is None:
            return True
        self._live.fatal = f"{problem}; nothing more is acknowledged, and the daemon stops"
        log.critical("%s", self._live.fatal)
        return False

    def _retry_words(self, delay: float) -> str:
        """When a failed commit is tried again: after the back-off, or (stopping) at the drain's next try."""
        return "when the stop's drain tries again" if self._syncing else f"in {delay:.1f} s"

    def _fail(self, exc: sqlite3.Error) -> None:
        """Roll back; keep every write of the group for a retry, their ids still counted as present."""
        assert self._store is not None
        self._store.rollback()
        delay = STORAGE_RETRY.delay(self._failures)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        log.error(
            "writing %d events failed (%s); none of them is acknowledged; retrying %s",
            sum(w.events for w in self._writes),
            exc,
            self._retry_words(delay),
        )
        self._live.last_commit_error = str(exc)

    def _after_commit(self, writes: list[WriteBatch], totals: dict[str, int], replies: list[list[bytes]]) -> None:
        counters = self._counters
        for name, value in totals.items():
            counters[name] += value
        counters["topic_count"] += sum(write.new_topics for write in writes)
        self._live.committed = dict(counters)
        self._live.commits += 1
        committed_writes = self._live.committed_writes
        finished: list[AckTicket] = []
        for write in writes:
            # An actor's writes arrive, and commit, in the order it sent them.
            committed_writes[write.origin] = write.serial
            for ticket, (new, duplicate) in write.tickets.items():
                ticket.new += new
                ticket.duplicate += duplicate
                ticket.remaining -= new + duplicate
                if ticket.remaining == 0:
                    finished.append(ticket)
        self._in_flight.release(totals["received"], sum(write.bytes for write in writes))
        if self._head_moved is not None and totals["unique_processed"]:
            self._head_moved()
        if self._acks is not None:
            for ticket in finished:
                self._acks.send_multipart([*ticket.envelope, msgpack.packb(ticket.reply())])
            for reply in replies:
                self._acks.send_multipart(reply)


def _joined_json_arrays(texts: list[str | None]) -> str | None:
    """JSON arrays as one array of all their items (None if any is None)."""
    if None in texts:
        return None
    return "[" + ",".join(text[1:-1] for text in texts if text and text != "[]") + "]"


def _sum_deltas(total: TopicDelta, delta: TopicDelta) -> TopicDelta:
    """Two deltas of one topic as one."""
    return TopicDelta(
        max(total.last_seq, delta.last_seq),
        max(total.last_ts_ns, delta.last_ts_ns),
        total.received + delta.received,
        total.duplicate_dropped + delta.duplicate_dropped,
        total.late + delta.late,
    )


def _per_topic(topics: Iterable[str]) -> dict[str, int]:
    """How many times each topic occurs."""
    counts: dict[str, int] = {}
    for topic in topics:
        counts[topic] = counts.get(topic, 0) + 1
    return counts
