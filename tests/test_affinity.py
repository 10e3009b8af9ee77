"""Rendezvous hashing of topics to daemons, the PostgreSQL config keys, the storage status line, and
how a publisher to several daemons counts and resends what a daemon that went down held."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from harness import Daemon
from test_publisher import nowhere, on_alarm, stopped

from actors.watchdog import Snapshot, status_line
from transport.affinity import rendezvous_order
from transport.backoff import Backoff
from transport.config import ConfigError, expand_environment, parse_config
from transport.publisher import BatchResult, DeliveryFailed, Publisher, PublisherClosed
from transport.workload import make_event, plan

ENDPOINTS = ["tcp://a:5557", "tcp://b:5557", "tcp://c:5557"]


def test_each_topic_ranks_every_endpoint_the_same_way_everywhere() -> None:
    for topic in ("orders", "payments", "t-17"):
        order = rendezvous_order(topic, ENDPOINTS)
        assert sorted(order) == sorted(ENDPOINTS)
        assert rendezvous_order(topic, list(reversed(ENDPOINTS))) == order


def test_topics_spread_and_removing_a_daemon_moves_only_its_topics() -> None:
    topics = [f"topic-{i}" for i in range(3000)]
    first = {topic: rendezvous_order(topic, ENDPOINTS)[0] for topic in topics}
    shares = [list(first.values()).count(endpoint) for endpoint in ENDPOINTS]
    assert all(800 < share < 1200 for share in shares), shares
    remaining = ENDPOINTS[:2]
    for topic in topics:
        after = rendezvous_order(topic, remaining)[0]
        if first[topic] in remaining:
            assert after == first[topic]
        else:  # the removed daemon's topics go to their second choice
            assert after == rendezvous_order(topic, ENDPOINTS)[1]


def test_postgresql_config_keys() -> None:
    config = parse_config(
        {"storage": {"backend": "postgresql", "dsn": "host=db dbname=x"}, "ingest": {"bind": "tcp://*:6000"}}
    )
    assert config.storage.backend == "postgresql"
    assert config.storage_node == f"{socket.gethostname()}:6000"
    assert parse_config({"storage": {"backend": "postgresql", "dsn": "host=db", "node": "n1"}}).storage_node == "n1"
    with pytest.raises(ConfigError, match=r"\[storage\] backend must be one of sqlite, postgresql"):
        parse_config({"storage": {"backend": "mysql"}})
    for unset in ({}, {"dsn": ""}, {"dsn": " \t"}):  # blank: libpq would connect with its defaults
        with pytest.raises(ConfigError, match=r"\[storage\] dsn must be set"):
            parse_config({"storage": {"backend": "postgresql", **unset}})


def test_dsn_expands_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/eventagg.service")
    written = "host=db passfile=${CREDENTIALS_DIRECTORY}/pg"
    config = parse_config({"storage": {"backend": "postgresql", "dsn": written}})
    assert config.storage.dsn == written  # as written for clients, which never use it
    assert expand_environment(config).storage.dsn == "host=db passfile=/run/credentials/eventagg.service/pg"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    unset = parse_config({"storage": {"backend": "postgresql", "dsn": "passfile=${CREDENTIALS_DIRECTORY}/pg"}})
    with pytest.raises(ConfigError, match=r"\[storage\] dsn .* CREDENTIALS_DIRECTORY, which is not set"):
        expand_environment(unset)


def test_a_dollar_that_is_no_variable_stays_and_dollar_dollar_is_one_dollar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGUSER_FOR_TEST", "alice")
    dsn = "user=$PGUSER_FOR_TEST password=Xy$9abc$$word options=$"
    config = parse_config({"storage": {"backend": "postgresql", "dsn": dsn}})
    assert expand_environment(config).storage.dsn == "user=alice password=Xy$9abc$word options=$"
    with pytest.raises(ConfigError, match=r"write \$\$ for a \$") as caught:
        expand_environment(parse_config({"storage": {"backend": "postgresql", "dsn": "password=pa$zq7x"}}))
    assert "pa$" not in str(caught.value) and "zq7x" not in str(caught.value)  # nor a piece of it


def test_the_status_line_says_the_daemon_waits_for_its_storage() -> None:
    snapshot = Snapshot(at=1.0, received=10, unique=8, duplicates=2, rejected=0, topics=1)
    assert "STORAGE" not in status_line(snapshot)
    line = status_line(snapshot, storage_error="storage PostgreSQL db:5432/x is unavailable: refused")
    assert line.startswith("WAITING FOR STORAGE, nothing new is acknowledged: storage PostgreSQL db:5432/x")


def test_the_status_line_names_failing_background_work() -> None:
    snapshot = Snapshot(at=1.0, received=10, unique=5, duplicates=5, rejected=0, topics=1)
    line = status_line(snapshot, background_errors=["retention's sweep failed: database or disk is full"])
    assert line.startswith("FAILING: retention's sweep failed: database or disk is full; 0 events/s; 5 unique")


def topic_for(endpoint: str, endpoints: list[str]) -> str:
    """A topic whose events go to ``endpoint`` first."""
    return next(f"t{n}" for n in range(1000) if rendezvous_order(f"t{n}", endpoints)[0] == endpoint)


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_close_within_an_affine_flush_ends_it_with_publisher_closed(daemon_factory: Callable[..., Daemon]) -> None:
    """close() from on_ack during an AffinePublisher's flush closed the daemons' publishers under
    the one reading replies (a raw AttributeError); from a signal handler, it flushed within the
    handler, then the flush went on into a publisher closed under it."""
    # The second daemon holds each batch 0.5 s (its reorder window), so the batch sent once the
    # first is acknowledged cannot be acknowledged within the same step of the flush: without
    # that, a quick enough daemon acknowledged everything and the flush rightly returned.
    first, second = daemon_factory("first").start(), daemon_factory("second", ordering={"window_ms": 500}).start()
    endpoints = [first.ack, second.ack]
    affine = Publisher(endpoints=endpoints, batch_size=5, window=1, linger=60, on_ack=lambda result: affine.close())
    events = [{**make_event(i, 1, "aff"), "topic": topic_for(second.ack, endpoints)} for i in range(10)]
    affine.publish_many(events)  # one batch sent, one waiting for room
    with pytest.raises(PublisherClosed, match="was closed during this call") as caught:
        affine.flush(timeout=20)
    assert caught.value.events == events[5:] == affine.held_events()
    assert affine.totals.acked_new == 5
    assert not any(publisher._finalizer.alive for publisher in affine._publishers.values())  # freed
    affine.close()  # again: harmless

    signalled = Publisher(endpoints=endpoints, close_timeout=1, deadline=None)
    held = [{**make_event(i, 1, "sig"), "topic": topic_for(first.ack, endpoints)} for i in range(3)]
    with stopped(first):
        signalled.publish_many(held)
        started = time.monotonic()
        with on_alarm(signalled.close, 0.3), pytest.raises(PublisherClosed, match="closed during this call") as caught:
            signalled.flush(timeout=20)
        assert time.monotonic() - started < 2
    assert caught.value.events == held == signalled.held_events()
    assert not any(publisher._finalizer.alive for publisher in signalled._publishers.values())


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_an_on_ack_failure_in_an_affine_close_still_settles_everything_then_raises(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """As a Publisher's (test_publisher): the batches still in flight stayed held for good."""
    first, second = daemon_factory("first").start(), daemon_factory("second").start()
    endpoints = [first.ack, second.ack]
    seen: list[BatchResult] = []

    def on_ack(result: BatchResult) -> None:
        seen.append(result)
        if len(seen) == 1:
            raise RuntimeError("the application's on_ack failed")

    affine = Publisher(endpoints=endpoints, batch_size=5, on_ack=on_ack)
    affine.publish_many({**make_event(i, 1, "af"), "topic": topic_for(endpoints[i % 2], endpoints)} for i in range(20))
    with pytest.raises(RuntimeError, match="the application's on_ack failed"):
        affine.close(timeout=20)
    # Every batch answered to on_ack (four, or more where a daemon slow to shake hands on a
    # loaded machine had its unsent events moved, in batches of their own, to the other).
    assert affine.held_events() == [] and affine.totals.acked_new == 20
    assert sum(result.size for result in seen) == 20, seen
    assert not any(publisher._finalizer.alive for publisher in affine._publishers.values())


# Every retry pause of the tests below. A publisher that closed its socket for a pause found a
# daemon back meanwhile only when the pause ended; one that keeps it open sends what it held
# within ZeroMQ's reconnect interval (0.1 to 0.2 s) of the daemon listening again. A quarter of
# the pause is the margin, for a loaded machine.
PAUSE_S = 6.0
PAUSES = Backoff(base=PAUSE_S, cap=PAUSE_S, jitter=0.0)


@contextlib.contextmanager
def starting(daemon: Daemon) -> Iterator[list[float]]:
    """Start ``daemon`` on another thread during the block, whose thread stays in the publisher's
    calls; the list gets the moment the daemon was ready (filled by the end of the block)."""
    ready: list[float] = []
    failures: list[BaseException] = []

    def start() -> None:
        try:
            daemon.start()
            ready.append(time.monotonic())
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        yield ready
    finally:
        thread.join(60)
    assert not failures and ready, failures


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_what_waits_for_daemons_that_are_down_is_no_retry_and_goes_as_soon_as_one_is_back(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Every daemon stopped: what is published then is held, never sent. Each ack_timeout counted
    it as a retry (totals.retries, on_retry) and closed the socket for a retry pause, so a daemon
    started again got it only when that pause ended."""
    back, other = daemon_factory("back").start(), daemon_factory("other").start()
    endpoints = [back.ack, other.ack]
    retried: list[int] = []
    publisher = Publisher(
        endpoints=endpoints,
        batch_size=10,
        ack_timeout=0.2,
        deadline=40.0,
        backoff=PAUSES,
        on_retry=lambda attempt, pause: retried.append(attempt),
    )
    warm_up, events = plan(20, 0.0, 20, 15, "wu"), plan(200, 0.0, 20, 16, "dn")
    try:
        publisher.publish_many(warm_up)
        publisher.flush(timeout=10)  # both answered: their connections are up
        back.terminate()
        other.terminate()
        publisher.publish_many(events)
        assert publisher.poll(0.6) == 200  # three ack_timeouts, and nothing could be sent
        with starting(back) as ready:  # only one comes back: it takes the other's topics too
            publisher.flush(timeout=30)
            done = time.monotonic()
    finally:
        publisher.close(timeout=0, flush=False)
    assert done - ready[0] < PAUSE_S / 4, done - ready[0]
    totals = publisher.totals
    assert (totals.sent, totals.acked_new, totals.acked_duplicate, totals.abandoned) == (220, 220, 0, 0), totals
    assert (totals.retries, retried) == (0, []), totals  # nothing was sent twice
    assert (
        back.wait_stats(
            unique_processed=200 + sum(rendezvous_order(event["topic"], endpoints)[0] == back.ack for event in warm_up)
        )["duplicate_dropped"]
        == 0
    )


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_batch_lost_with_its_connection_is_resent_as_soon_as_the_daemon_is_back_and_is_the_one_retry(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """A batch sent, then its daemon killed before reading it: the cut connection says no answer
    can come on it, so the batch goes again as soon as the daemon is back (it waited out its
    ack_timeout, then a retry pause with the socket closed). That resend is the only retry: the
    batches published while the daemon was down were sent once, when it was back."""
    daemon = daemon_factory("flapping").start()
    pauses: list[float] = []
    publisher = Publisher(
        endpoints=[daemon.ack],
        batch_size=10,
        ack_timeout=1.0,
        deadline=40.0,
        backoff=PAUSES,
        on_retry=lambda attempt, pause: pauses.append(pause),
    )
    events = plan(30, 0.0, 3, 17, "cut")
    try:
        publisher.publish(make_event(0, 1, "wu"))
        publisher.flush(timeout=10)  # batch 1: the connection is up
        assert daemon.proc is not None
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # batch 2 reaches its kernel, never the daemon
        publisher.publish_many(events[:10])
        publisher.poll(0.1)
        assert publisher.in_flight == 1
        daemon.kill()
        publisher.poll(0.3)  # sees the connection cut
        publisher.publish_many(events[10:])  # batches 3 and 4: held, the connection is down
        publisher.poll(1.5)  # past batch 2's ack_timeout
        with starting(daemon) as ready:
            publisher.flush(timeout=30)
            done = time.monotonic()
    finally:
        publisher.close(timeout=0, flush=False)
    assert done - ready[0] < PAUSE_S / 4, done - ready[0]
    totals = publisher.totals
    assert (totals.sent, totals.acked_new, totals.acked_duplicate, totals.retries) == (31, 31, 0, 1), totals
    assert pauses == [0.0]  # one failed attempt, the cut one: sent again once connected, no pause
    assert {result.batch_id: result.attempts for result in publisher.results} == {1: 1, 2: 2, 3: 1, 4: 1}


@pytest.mark.timeout(30)
def test_max_attempts_counts_sends_not_the_time_a_daemon_down_made_a_batch_wait() -> None:
    """A publisher that watches its connection sends nothing while the daemon is down, so no attempt
    fails: max_attempts=1 gave up at the first ack_timeout all the same; the deadline decides."""
    retried: list[int] = []
    publisher = Publisher(
        endpoints=[nowhere()], ack_timeout=0.1, deadline=1.0, max_attempts=1, on_retry=lambda a, p: retried.append(a)
    )
    try:
        publisher.publish(make_event(0, 1, "ma"))
        with pytest.raises(DeliveryFailed) as failed:
            publisher.flush(timeout=10)
    finally:
        publisher.close(timeout=0, flush=False)
    assert 1.0 <= failed.value.elapsed < 1.6, failed.value.elapsed
    assert failed.value.attempts == 0 and "never sent" in str(failed.value), str(failed.value)
    assert (publisher.totals.retries, retried) == (0, [])
