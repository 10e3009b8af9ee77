"""The daemon, the composition root: starts its parts in a fixed order and stops them in reverse.

Start: dedup actor (opens the database), ordering actors, router, stats actor, each confirmed
alive by a ping; then the ingest and query sockets are bound, and only then is the daemon
ready. Stop (SIGTERM/SIGINT): stop reading, push everything queued through router → ordering
(buffers flushed in order) → dedup (committed), forward the last acknowledgements, close the
sockets, stop the actors in reverse. SIGHUP re-reads the config file's log level.

Signal handlers only note the signal (and, through ``signal.set_wakeup_fd``, wake the main
thread): the main loop does the work, once for however many signals came, so a storm of SIGHUPs
never nests reloads inside one another and a SIGTERM still drains.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pykka
import zmq

from actors.bind_check import bind_place, bind_problem
from actors.dedup import DedupActor
from actors.event_sources import EventSource, SqliteEventSource
from actors.flow import InFlight, LiveFigures, PipelineDepth
from actors.ingest import IngestServer
from actors.messages import Freeze, Ping, Sync, Tick
from actors.ordering import OrderingActor
from actors.query_server import QueryServer
from actors.reader import ReaderActor
from actors.router import RouterActor
from actors.stats import StatsActor
from actors.subscriptions import HeadSignal, SubscriptionServer
from actors.watchdog import ServiceMonitor
from transport.config import Config, ConfigError, colliding_binds, load_config
from transport.descriptors import DescriptorWatch, raise_descriptor_limit
from transport.logs import flush_held_back, set_level
from transport.queries import debug_hooks_enabled
from transport.sdnotify import Notifier, NotifyError, watchdog_interval
from transport.security import SecurityError, ServerSecurity
from transport.threadnames import name_os_threads

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
INGEST_DRAIN_TIMEOUT_S = 15.0
# ... while commits fail: what waits for in-flight credit gets it only if one succeeds meanwhile,
# so the writer is asked to try again every DRAIN_RETRY_S (its own back-off is for a running daemon).
FAILING_DRAIN_TIMEOUT_S = 3.0
DRAIN_RETRY_S = 0.5
DRAIN_TIMEOUT_S = 60.0
# After the drain, all the actors together: an actor stuck in a call that never returns (a
# storage server that stopped answering) must not keep the stop past systemd's TimeoutStopSec.
ACTORS_STOP_TIMEOUT_S = 15.0
DEDUP_TICK_S = 0.1
SWITCH_INTERVAL_S = 0.0005
GC_THRESHOLDS = (500_000, 20, 100)
FATAL_CHECK_S = 0.5  # how often the main thread looks for a reason to stop (live.fatal)

# What to check when a bind fails, by errno (libzmq binds a tcp host as an address or an interface name).
_BIND_HINTS = {
    errno.EADDRINUSE: "; is another daemon running, or is the port taken?",
    errno.EADDRNOTAVAIL: "; the host must be an address of this machine (or * for all)",
    errno.ENODEV: "; the host must be an address or interface of this machine (or * for all)",
    errno.ENOENT: "; create the ipc:// path's folder, or bind elsewhere",
    errno.EACCES: "; this user may not bind there (a port below 1024, or a folder it cannot write)",
    errno.EEXIST: "; name a path where nothing is yet, or remove that file if it is not needed",
    errno.ENAMETOOLONG: "; choose a shorter path (a Unix socket's path is at most 107 bytes)",
}
# Bind failures only a change of the configuration (or of what it names) cures, so they are
# refused as a configuration is (exit 2, not restarted). A port in use is not one: another
# daemon may be stopping, and starting again a moment later can succeed.
_CONFIG_BIND_ERRNOS = frozenset(
    {errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT, errno.EACCES, errno.EEXIST, errno.ENAMETOOLONG}
)


class StartupError(Exception):
    """The daemon could not start: a socket could not be bound or an actor did not come up."""


class ConfigRefused(StartupError):
    """The daemon will not start with this configuration (an unsafe bind, a key file missing or
    unsafe, an endpoint it cannot bind as written): nothing was opened, and starting again
    without changing it cannot help."""


class Daemon:
    """The whole aggregator in one process: actors, ingest and query threads."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.live = LiveFigures()
        self._at_start: dict[str, int] = {}
        self.in_flight = InFlight(config.ingest.max_in_flight, config.ingest.max_in_flight_bytes)
        self.context: zmq.Context[Any] = zmq.Context()
        self.dedup: pykka.ActorRef[Any] | None = None
        self.ordering: list[pykka.ActorRef[Any]] = []
        self.router: pykka.ActorRef[Any] | None = None
        self.stats: pykka.ActorRef[Any] | None = None
        # Answers events and topics; not in `actors`, so neither health nor the watchdog waits on a page.
        self.reader: pykka.ActorRef[Any] | None = None
        self.ingest: IngestServer | None = None
        self.query: QueryServer | None = None
        self.head = HeadSignal()  # the dedup actor's "events committed" wake-up for the subscriptions
        self.subscriptions: SubscriptionServer | None = None
        self.security: ServerSecurity | None = None
        self._stop = threading.Event()
        self._signals: set[int] = set()  # noted by the signal handler, acted on by the main loop
        self._ticker: threading.Thread | None = None
        self.notifier = Notifier.from_environment()
        self._monitor: ServiceMonitor | None = None
        self._descriptors = DescriptorWatch()
        self.stuck_actors: list[str] = []  # those that did not stop when asked (see stop)

    @property
    def actors(self) -> dict[str, pykka.ActorRef[Any]]:
        """Every actor by name, in start order."""
        named: dict[str, pykka.ActorRef[Any]] = {}
        if self.dedup is not None:
            named["dedup"] = self.dedup
        for index, ref in enumerate(self.ordering):
            named[f"ordering-{index}"] = ref
        if self.router is not None:
            named["router"] = self.router
        if self.stats is not None:
            named["stats"] = self.stats
        return named

    def start(self) -> None:
        """Start every part; raises :class:`StartupError` (after undoing what started) on failure."""
        cfg = self.config
        postgresql = cfg.storage.backend == "postgresql"
        try:
            try:
                # Checked first: an unsafe bind or a bad key file must not even open the database.
                self.security = ServerSecurity(self.context, cfg, on_refused=self._add_refused)
            except SecurityError as exc:
                raise ConfigRefused(str(exc)) from None
            self._check_binds()  # and a start that cannot bind must not create or migrate the database
            self.dedup = self._start_dedup(
                commit_max_events=cfg.storage.commit_max_events,
                commit_max_ms=cfg.storage.commit_max_ms,
                lookup_group=cfg.ordering.actors,
                retention=cfg.retention,
                in_flight=self.in_flight,
                live=self.live,
                zmq_context=self.context,
                head_moved=self.head.moved,
            )
            self._confirm(self.dedup, "dedup")
            # The database's counters as this run found them: the stop line says what the run did.
            self._at_start = dict(self.live.committed)
            self.live.buffered = [0] * cfg.ordering.actors
            self.live.committed_writes = [0] * cfg.ordering.actors
            for index in range(cfg.ordering.actors):
                ref = OrderingActor.start(
                    index,
                    self.dedup,
                    window_ms=cfg.ordering.window_ms,
                    max_buffered=cfg.ordering.max_buffered,
                    max_topics=max(1, cfg.ordering.max_topics // cfg.ordering.actors),
                    in_flight=self.in_flight,
                    live=self.live,
                    row_tickets=postgresql,
                    keys_json=not postgresql,
                )
                self.ordering.append(ref)
                self._confirm(ref, f"ordering-{index}")
            self.router = RouterActor.start(self.ordering)
            self._confirm(self.router, "router")
            self.stats = self._start_stats(
                in_flight=self.in_flight,
                live=self.live,
                liveness=lambda: self.liveness(exclude=("stats",)),
                freeze=self.freeze if debug_hooks_enabled() else None,
                endpoints={
                    "ingest": self.config.ingest.bind,
                    "ack": self.config.ingest.ack_bind,
                    "query": self.config.query.bind,
                    "subscribe": self.config.subscribe.bind,
                },
            )
            self._confirm(self.stats, "stats")
            self.reader = self._start_reader()
            self._confirm(self.reader, "reader")
            self.security.start()  # the ZAP handler must be up before any server socket binds
            secure, gate = self.security.hook, self.security.gate
            # The query and subscribe servers' ROUTER sockets are named for the refusals they log.
            secure_query, secure_subscribe = self.security.hook_for("query"), self.security.hook_for("subscribe")
            router, dedup = self.router, self.dedup
            assert router is not None and dedup is not None  # started and confirmed above
            self.ingest = self._bind(
                "ingest",
                lambda: IngestServer(
                    self.context,
                    cfg.ingest,
                    router,
                    dedup,
                    self.in_flight,
                    secure,
                    depth=self._pipeline_depth(),
                    live=self.live,
                    gate=gate,
                    nul_in_text=cfg.storage.backend != "postgresql",
                ),
            )
            self.query = self._bind(
                "query",
                lambda: QueryServer(self.context, cfg.query, self.stats, secure_query, reader=self.reader, gate=gate),  # type: ignore[arg-type]
            )
            source = self._event_source()
            self.subscriptions = self._bind(
                "subscribe",
                lambda: SubscriptionServer(
                    self.context, cfg.subscribe, source, dedup, self.head, secure_subscribe, gate
                ),
            )
        except BaseException:
            self._stop_actors()
            if self.security is not None:
                self.security.stop()
            # Sockets made before the failure (e.g. one endpoint bound, the next taken) would make
            # term() wait forever; no thread uses them yet, so close them all here.
            self.context.destroy(linger=0)
            raise
        self.ingest.start()
        self.query.start()
        if self.subscriptions is not None:
            self.subscriptions.start()
        self._ticker = threading.Thread(target=self._tick, name="ticker", daemon=True)
        self._ticker.start()
        name_os_threads()
        log.info(
            "eventagg ready: ingest %s, acked ingest %s, queries %s, subscriptions %s, database %s, %d ordering actors",
            cfg.ingest.bind,
            cfg.ingest.ack_bind,
            cfg.query.bind,
            cfg.subscribe.bind,
            self._storage_name(),
            cfg.ordering.actors,
        )

    # The one place each store is chosen: the dedup actor owns the writer, the stats actor the
    # reader, the subscription thread an event source.
    def _event_source(self) -> EventSource:
        storage = self.config.storage
        if storage.backend == "postgresql":
            from actors.postgres import PostgresEventSource

            return PostgresEventSource(storage.dsn, self.config.storage_node)
        return SqliteEventSource(self.config.database_path)

    def _start_dedup(self, **kwargs: Any) -> pykka.ActorRef[Any]:
        storage = self.config.storage
        if storage.backend == "postgresql":
            from actors.postgres import PostgresDedupActor

            return PostgresDedupActor.start(storage.dsn, self.config.storage_node, **kwargs)
        return DedupActor.start(
            self.config.database_path, synchronous=storage.synchronous, cache_mb=storage.cache_mb, **kwargs
        )

    def _start_stats(self, **kwargs: Any) -> pykka.ActorRef[Any]:
        if self.config.storage.backend == "postgresql":
            from actors.postgres import PostgresStatsActor

            return PostgresStatsActor.start(self.config.storage.dsn, self.config.storage_node, **kwargs)
        return StatsActor.start(self.config.database_path, **kwargs)

    def _start_reader(self) -> pykka.ActorRef[Any]:
        """The actor that answers events and topics, apart from the one that answers stats and health."""
        if self.config.storage.backend == "postgresql":
            from actors.postgres import PostgresStatsActor

            # A second stats actor on a connection of its own: its answer() serves events and topics.
            return PostgresStatsActor.start(
                self.config.storage.dsn,
                self.config.storage_node,
                self.config.query.max_page_bytes,
                in_flight=self.in_flight,
                live=self.live,
                liveness=lambda: {},
            )
        return ReaderActor.start(self.config.database_path, self.config.query.max_page_bytes)

    def _add_refused(self, count: int) -> None:
        self.live.refused += count

    def _storage_name(self) -> str:
        if self.config.storage.backend == "postgresql":
            from actors.pg_session import describe_dsn

            return f"{describe_dsn(self.config.storage.dsn)} (node {self.config.storage_node})"
        return str(self.config.database_path)

    def _pipeline_depth(self) -> PipelineDepth:
        assert self.router is not None and self.dedup is not None  # started before ingest
        refs = [self.router, *self.ordering, self.dedup]
        return PipelineDepth([ref.actor_inbox for ref in refs], self.config.ingest.gather_at_queued)

    def _confirm(self, ref: pykka.ActorRef[Any], name: str) -> None:
        try:
            answer = ref.ask(Ping(), timeout=START_TIMEOUT_S)
        except pykka.Timeout:
            raise StartupError(f"actor {name} did not start within {START_TIMEOUT_S:.0f} s") from None
        if isinstance(answer, Exception):
            raise answer

    def _check_binds(self) -> None:
        # The config refuses two binds written alike; this also finds those alike once resolved
        # (localhost and 127.0.0.1, a path and the same path through ..).
        collision = colliding_binds(self.config, bind_place)
        if collision is not None:
            raise ConfigRefused(collision)
        for key, endpoint in self.config.daemon_binds.items():
            problem = bind_problem(endpoint)
            if problem is not None:
                hint = _BIND_HINTS.get(problem.errno or 0, "")
                refusal = ConfigRefused if problem.errno in _CONFIG_BIND_ERRNOS else StartupError
                raise refusal(f"cannot bind {key}: {problem.strerror}{hint}")

    def _bind(self, what: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except zmq.ZMQError as exc:
            hint = _BIND_HINTS.get(exc.errno or 0, "")
            raise StartupError(f"cannot bind the {what} endpoint: {exc}{hint}") from None

    def _tick(self) -> None:
        window_s = self.config.ordering.window_ms / 1000
        # Tick often enough that an event waits at most about a tenth of the window too long.
        interval = min(DEDUP_TICK_S, max(0.002, window_s / 10)) if window_s > 0 else DEDUP_TICK_S
        last_dedup_tick = 0.0
        live = self.live
        while not self._stop.is_set():
            if window_s > 0 and not any(live.buffered):
                # Nothing waits in any window: sleep until an ordering actor says something does
                # (it sets the event after publishing its count, so clearing first loses nothing).
                live.waiting.clear()
                if not any(live.buffered) and not self._stop.is_set():  # stop() sets both, stop first
                    live.waiting.wait(DEDUP_TICK_S)
            else:
                self._stop.wait(interval)
            now = time.monotonic()
            try:
                if window_s > 0:
                    buffered = live.buffered
                    for index, ref in enumerate(self.ordering):
                        # Waking an actor with nothing waiting releases nothing (idle, these
                        # wake-ups and this loop's were 6 of the daemon's 7 % of a CPU).
                        if buffered[index]:
                            ref.tell(Tick())
                if now - last_dedup_tick >= DEDUP_TICK_S and self.dedup is not None:
                    self.dedup.tell(Tick())
                    last_dedup_tick = now
                    flush_held_back()  # a burst of refusals nothing follows is counted in the log too
            except pykka.ActorDeadError:
                log.error("an actor has died; ticks stop")
                return

    def liveness(self, timeout: float = 2.0, exclude: tuple[str, ...] = ()) -> dict[str, bool]:
        """Which actors answer a ping within ``timeout`` (all asked at once), and the ingest thread."""
        alive: dict[str, bool] = {}
        futures = {}
        for name, ref in self.actors.items():
            if name in exclude:
                continue
            try:
                futures[name] = ref.ask(Ping(), block=False)
            except pykka.ActorDeadError:
                alive[name] = False
        deadline = time.monotonic() + timeout
        for name, future in futures.items():
            try:
                alive[name] = future.get(timeout=max(0.0, deadline - time.monotonic())) is True
            except (pykka.Timeout, pykka.ActorDeadError):
                alive[name] = False
        if self.ingest is not None:
            alive["ingest"] = self.ingest.alive
        if self.subscriptions is not None:
            alive["subscriptions"] = self.subscriptions.alive
        return alive

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (from another thread; :meth:`run` notices within ``FATAL_CHECK_S``)."""
        self._stop.set()

    def drain(self) -> bool:
        """Push everything received through the pipeline and commit it; True if it all committed."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S

        def remaining() -> float:
            return max(0.1, deadline - time.monotonic())

        try:
            if self.router is not None:
                self.router.ask(Ping(), timeout=remaining())
            for ref in self.ordering:
                ref.ask(Sync(), timeout=remaining())
            if self.dedup is not None:
                return bool(self.dedup.ask(Sync(), timeout=remaining()))
        except (pykka.Timeout, pykka.ActorDeadError) as exc:
            log.error("drain did not finish (%s); uncommitted events are not acknowledged", type(exc).__name__)
            return False
        return True

    def stop(self) -> bool:
        """Stop reading, drain, close; True when everything received was committed."""
        log.info("stopping: no new events are read; draining what was received")
        if self._monitor is not None:
            self._monitor.stop()
        fatal = f"FAILED: {self.live.fatal}; " if self.live.fatal is not None else ""
        self.notifier.stopping(f"{fatal}stopping: draining {self.in_flight.value:,} events in flight")
        self._stop.set()
        self.live.waiting.set()  # after _stop: the ticker may sleep on it, and must see the stop
        failing = self.live.last_commit_error is not None
        wait = FAILING_DRAIN_TIMEOUT_S if failing else INGEST_DRAIN_TIMEOUT_S
        deadline = time.monotonic() + wait
        read_all = True
        if self.ingest is not None:
            self.ingest.stop_accepting()
            # Let the ingest thread take what its sockets already hold (and have it decoded).
            read_all = not self.ingest.alive or self._wait_ingest_drained(deadline)
            if not read_all:
                log.warning(
                    "ingest did not finish reading what was queued within %.0f s%s",
                    wait,
                    f" (commits are failing: {self.live.last_commit_error})" if failing else "",
                )
        drained = self.drain()
        while not drained and self.live.last_commit_error is not None and time.monotonic() < deadline:
            time.sleep(DRAIN_RETRY_S)
            drained = self.drain()
        drained = drained and read_all  # what stayed queued in the sockets is lost as well
        if self.ingest is not None:
            self.ingest.close()
        if self.query is not None:
            self.query.close()
        if self.subscriptions is not None:
            self.subscriptions.close()
        if self.security is not None:
            self.security.stop()
        if self._ticker is not None:
            self._ticker.join(2.0)
        if self._monitor is not None:
            self._monitor.join(2.0)
        self.stuck_actors = self._stop_actors()
        if self.stuck_actors:
            # Their sockets stay open in their threads, so the context could not end: the process
            # exits without it (see run). Nothing uncommitted was acknowledged.
            log.error(
                "actor(s) %s did not stop within %.0f s; exiting without them",
                ", ".join(self.stuck_actors),
                ACTORS_STOP_TIMEOUT_S,
            )
            drained = False
        else:
            self.head.close()
            self.context.term()
        counters = self.live.committed
        # The totals first (what stats shows: the database's, on PostgreSQL this node's), then this run's:
        # the totals alone read as what this run did, thousands received by a run that got none.
        names = ("received", "unique_processed", "duplicate_dropped", "rejected")
        total = [counters.get(name, 0) for name in names]
        run = [counters.get(name, 0) - self._at_start.get(name, 0) for name in names]
        # An incomplete drain loses what was received and not committed: said with its count (the
        # docs promise what could not be committed or read), as an error, since the exit is 1.
        unread = "; what stayed queued in its sockets was not read either" if not read_all else ""
        incomplete = f" (drain incomplete: {self.in_flight.value:,} events received were not committed{unread})"
        log.log(
            logging.INFO if drained else logging.ERROR,
            "stopped: received %d, unique %d, duplicates %d, rejected %d in all;"
            " this run received %d, unique %d, duplicates %d, rejected %d%s",
            *total,
            *run,
            "" if drained else incomplete,
        )
        return drained

    def _wait_ingest_drained(self, deadline: float) -> bool:
        """Wait until the ingest thread has handed on what its sockets held, or ``deadline``; while
        commits fail, ask the writer to try again meanwhile: what waits needs the credit back."""
        assert self.ingest is not None
        while not self.ingest.wait_drained(max(0.0, min(DRAIN_RETRY_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            if self.live.last_commit_error is not None and self.dedup is not None:
                self.dedup.tell(Sync())  # commits what it holds now, whatever its back-off says
        return True

    def _stop_actors(self) -> list[str]:
        """Stop the actors, newest first, within ``ACTORS_STOP_TIMEOUT_S`` in all; the names of those still running."""
        named = [*self.actors.items(), *([("reader", self.reader)] if self.reader is not None else [])]
        deadline = time.monotonic() + ACTORS_STOP_TIMEOUT_S
        stuck = []
        for name, ref in reversed(named):
            try:
                ref.stop(timeout=max(0.1, deadline - time.monotonic()))
            except pykka.Timeout:
                stuck.append(name)
            except pykka.ActorDeadError:
                pass
        return stuck

    def run(self) -> int:
        """Start, serve until SIGTERM or SIGINT, stop; the process exit status."""
        # The dedup actor drops the GIL for every row SQLite writes and must win it back from
        # the ingest and ordering threads; at CPython's default 5 ms switch interval it waits
        # long for it. 0.5 ms measured +12 % events/s and stats p99 60 -> 20 ms (bench.py, 3 runs).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # Nearly every object an event makes dies by reference count, but the cyclic collector
        # still ran ~150 times a second at full speed (700 allocations apart): 0.7 s of a 200 000-
        # event run, with pauses up to 18 ms. What does outlive its event is each topic's state,
        # so with many topics 50 000 apart still meant 15 collections a 200 000-event run of
        # 100 000 topics (0.20-0.28 s, stats p99 27-34 ms); 500 000 apart, none (13-18 ms), and
        # over 1 000 000 events of 1 000 000 topics 3 collections (0.38 s) instead of 76 (1.47 s),
        # the longest pause the same 0.13 s (bench.py, gc.callbacks).
        gc.set_threshold(*GC_THRESHOLDS)
        raise_descriptor_limit()
        wake, woken = socket.socketpair()
        for end in (wake, woken):
            end.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._note_signal)
        try:
            self.start()
            gc.freeze()  # what start-up made lives as long as the process: keep it out of every collection
            self._notify_ready()
            if not self._serve(woken):
                return 1
            status = 0 if self.stop() and self.live.fatal is None else 1
            if self.stuck_actors:
                # A stuck actor's thread would hold the interpreter's exit for ever (pykka's are not daemon threads).
                logging.shutdown()
                os._exit(1)
            return status
        finally:
            signal.set_wakeup_fd(previous_fd)
            wake.close()
            woken.close()

    def _note_signal(self, signum: int, frame: Any) -> None:
        """The handler of SIGTERM, SIGINT and SIGHUP: note the signal, nothing more (see :meth:`_serve`)."""
        self._signals.add(signum)

    def _serve(self, woken: socket.socket) -> bool:
        """Act on the signals noted, until one says stop; False when the daemon stopped fatally instead."""
        while True:
            select.select([woken], [], [], FATAL_CHECK_S)
            try:
                while woken.recv(4096):  # the wake-up bytes; which signals came is in _signals
                    pass
            except BlockingIOError:
                pass
            self._descriptors.check(time.monotonic())
            noted, self._signals = self._signals, set()
            if noted & {signal.SIGTERM, signal.SIGINT}:
                self._stop.set()
            if self._stop.is_set():
                return True
            if signal.SIGHUP in noted:
                try:
                    self.reload()  # once, for every SIGHUP noted since the last
                except Exception:  # a reload must never end this loop: signals and fatal checks live here
                    log.exception("SIGHUP: reload failed; the daemon goes on with the config it had")
            if self.live.fatal is not None:
                self._stop_fatally(self.live.fatal)
                return False

    def _stop_fatally(self, reason: str) -> None:
        """Stop because the daemon cannot go on safely (e.g. its database file is gone); exits non-zero."""
        log.critical("stopping: %s", reason)
        self.notifier.status(f"FAILED: {reason}")
        self.stop()

    def reload(self) -> None:
        """Re-read what can change at run time: the log level and the authorized CURVE keys."""
        source = self.config.source
        if source is None:
            log.info("SIGHUP: no config file to reload")
            return
        try:
            fresh = load_config(source)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded: %s", exc)
            return
        set_level(fresh.log.level)
        if self.security is not None:
            self.security.reload()
        # The folder's keys are re-read, not the setting naming it: the old folder stays in force,
        # which the operator who points it elsewhere (to revoke a key, say) must be told.
        folder, asked = self.config.security.authorized_keys, fresh.security.authorized_keys
        if asked != folder:
            log.warning(
                "SIGHUP: [security] authorized_keys changed from %r to %r: that needs a restart (until then the "
                "old setting stays in force)",
                folder,
                asked,
            )
        log.warning(
            "SIGHUP: re-read %s: log level %s (changes other than it and the authorized keys need a restart)",
            source,
            fresh.log.level,
        )

    def _notify_ready(self) -> None:
        """Tell systemd the daemon is ready, then keep its status and watchdog fed (only under systemd)."""
        if not self.notifier.enabled:
            return
        try:
            interval = watchdog_interval()
        except NotifyError as exc:
            log.error("the systemd watchdog is off: %s", exc)
            interval = None
        self._monitor = ServiceMonitor(
            self.notifier, lambda timeout: self.liveness(timeout), self.live, watchdog_s=interval
        )
        self.notifier.ready(self._monitor.status_text())
        self._monitor.start()
        if interval is not None:
            log.info("systemd watchdog on: pinging every part every %.1f s", interval)

    def freeze(self, actor: str, seconds: float) -> None:
        """Test hook: make one actor (named as in :attr:`actors`) unresponsive for ``seconds``.

        Raises ValueError naming the known actors when ``actor`` is not one of them.
        """
        ref = self.actors.get(actor) or (self.reader if actor == "reader" else None)
        if ref is None:
            raise ValueError(f"no actor named {actor!r}; actors: {', '.join(self.actors)}")
        log.warning("test hook: freezing %s for %.1f s", actor, seconds)
        ref.tell(Freeze(seconds))
