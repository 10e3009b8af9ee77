"""The publisher library against real daemons (or none): validation, retries, back-pressure, acks."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, eventually, free_port, run_script, write_config

from transport.affinity import rendezvous_order
from transport.backoff import Backoff
from transport.client import NoAnswer, QueryClient
from transport.publisher import (
    BatchRefused,
    BatchResult,
    DeliveryFailed,
    InvalidEvent,
    Publisher,
    PublisherClosed,
    PublisherInUse,
    PublishTimeout,
)
from transport.security import curve_client
from transport.workload import make_event, plan


def nowhere() -> str:
    """An endpoint nothing listens on."""
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.mark.e2e
def test_a_bad_event_raises_at_once_with_the_reason_and_nothing_is_queued() -> None:
    with Publisher(nowhere(), deadline=1.0) as publisher:
        good = make_event(0, 1, "v")
        with pytest.raises(InvalidEvent, match="whitespace"):
            publisher.publish({**good, "topic": "a b"})
        with pytest.raises(InvalidEvent, match="timezone"):
            publisher.publish({**good, "timestamp": "2025-10-22T10:00:00"})
        with pytest.raises(InvalidEvent, match="missing field 'source'"):
            publisher.publish({k: v for k, v in good.items() if k != "source"})
        with pytest.raises(InvalidEvent, match="msgpack"):
            publisher.publish({**good, "payload": {"x": object()}})
        with pytest.raises(InvalidEvent, match=r"^event 2: event_id must be a string"):
            publisher.publish_many([good, make_event(1, 1, "v"), {**good, "event_id": 7}])
        assert publisher.unacknowledged == 0
        assert publisher.totals.sent == 0


def test_no_daemon_backs_off_with_growing_capped_pauses_then_raises_naming_the_endpoint() -> None:
    endpoint = nowhere()
    retries: list[tuple[int, float, float]] = []
    sockets: list[zmq.Socket[Any]] = []
    publisher = Publisher(
        endpoint,
        ack_timeout=0.2,
        deadline=4.0,
        backoff=Backoff(base=0.1, factor=2.0, cap=0.8, jitter=0.0),
        on_retry=lambda attempt, pause: retries.append((attempt, pause, time.monotonic())),
        configure=sockets.append,
    )
    events = [make_event(i, 2, "nd") for i in range(10)]
    started = time.monotonic()
    try:
        publisher.publish_many(events)
        with pytest.raises(DeliveryFailed) as caught:
            publisher.flush(timeout=30)
        took = time.monotonic() - started
        assert publisher.unacknowledged == 0
    finally:
        publisher.close()
    error = caught.value
    assert endpoint in str(error) and "ack_bind" in str(error)
    assert error.elapsed >= 4.0 and f"{error.elapsed:.1f} s" in str(error)
    assert error.events == events  # every unacknowledged event is handed back, in order
    assert 4.0 <= took < 20.0
    pauses = [pause for _, pause, _ in retries]
    assert pauses[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.8])  # growth, then the cap
    assert all(pause <= 0.8 for pause in pauses)
    assert [attempt for attempt, _, _ in retries] == list(range(1, len(retries) + 1))
    # Between two retries the publisher waited its pause and then a whole ack timeout.
    for (_, pause, at), (_, _, next_at) in zip(retries, retries[1:]):
        assert next_at - at >= pause + 0.2 - 0.02
    # Each attempt had a socket of its own, configured, and a fresh one follows giving up. The
    # last pause may end at the deadline, which then comes before that retry's send.
    assert error.attempts == len(sockets) - 1
    assert len(retries) <= error.attempts <= len(retries) + 1


@pytest.mark.e2e
def test_attempt_limit_with_full_jitter() -> None:
    retries: list[float] = []
    with Publisher(
        nowhere(),
        ack_timeout=0.1,
        deadline=None,
        max_attempts=4,
        backoff=Backoff(base=0.05, factor=2.0, cap=0.2, jitter=1.0),
        on_retry=lambda attempt, pause: retries.append(pause),
    ) as publisher:
        publisher.publish(make_event(0, 1, "j"))
        with pytest.raises(DeliveryFailed, match=r"\(4 attempts\)"):
            publisher.flush(timeout=30)
    assert len(retries) == 3
    assert all(0.0 <= pause <= ceiling for pause, ceiling in zip(retries, [0.05, 0.1, 0.2]))


@pytest.mark.e2e
def test_delivery_failed_hands_back_every_event_of_the_call_that_raised() -> None:
    events = [make_event(i, 1, "hb") for i in range(40)]
    with Publisher(
        nowhere(), batch_size=5, window=1, ack_timeout=0.1, deadline=0.5, backoff=Backoff(base=0.05, cap=0.1)
    ) as publisher:
        with pytest.raises(DeliveryFailed) as caught:
            publisher.publish_many(events)  # the window is full after 5 events: it gives up inside
        assert caught.value.events == events
        assert publisher.unacknowledged == 0
        single = make_event(99, 1, "hb")
        publisher.publish_many(events[:10])  # one batch in flight, one full batch pending
        with pytest.raises(DeliveryFailed) as caught:
            publisher.publish(single)
        assert caught.value.events == [*events[:10], single]
        # Its message counts what .events holds, the events the call added included (it said 10).
        assert "11 unacknowledged events are in this exception's .events" in str(caught.value)
        # It crosses a process boundary (multiprocessing pickles it) whole.
        again = pickle.loads(pickle.dumps(caught.value))
        assert (str(again), again.events) == (str(caught.value), caught.value.events)


@pytest.mark.e2e
def test_a_daemon_that_starts_before_the_deadline_gets_everything(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("late")
    failures: list[BaseException] = []

    def start_late() -> None:
        time.sleep(1.5)
        try:
            daemon.start()
        except BaseException as exc:
            failures.append(exc)

    starter = threading.Thread(target=start_late)
    starter.start()
    events = plan(3000, 0.1, 5, 3, "late")
    try:
        with Publisher(
            daemon.ack, batch_size=100, window=4, ack_timeout=0.5, deadline=60.0, backoff=Backoff(base=0.1, cap=1.0)
        ) as publisher:
            publisher.publish_many(events)  # blocks on the full window while nobody answers
            publisher.flush(timeout=60)
    finally:
        starter.join(60)
    assert not failures, failures
    totals = publisher.totals
    assert totals.retries >= 1
    assert totals.sent == 3000 and totals.acked == 3000 and totals.rejected == 0
    # A batch whose first send reached the daemon just before the publisher gave up on its ack
    # is resent and acknowledged as duplicates: acked_new can only undercount, never overcount.
    assert 0 < totals.acked_new <= 2700
    assert totals.acked_duplicate >= 300
    stats = daemon.wait_stats(unique_processed=2700)
    assert stats["received"] == stats["unique_processed"] + stats["duplicate_dropped"]
    assert len(daemon.events()) == 2700


@pytest.mark.e2e
def test_rejected_events_come_back_by_index_and_the_rest_is_stored(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("reject", ingest={"max_payload_bytes": 200}).start()
    events = [make_event(i, 1, "r") for i in range(10)]
    for index in (3, 7):
        events[index] = make_event(index, 1, "r", payload_bytes=500)
    # The publisher's own limit is the default 1 MiB, so the daemon is the one to refuse them.
    with Publisher(daemon.ack, batch_size=10) as publisher:
        publisher.publish_many(events)
        publisher.flush(timeout=30)
    [result] = publisher.results
    assert (result.size, result.new, result.duplicate) == (10, 8, 0)
    assert [(r.index, r.event["event_id"]) for r in result.rejected] == [(3, "r3"), (7, "r7")]
    assert all("over the limit of 200" in r.reason for r in result.rejected)
    assert publisher.totals.rejected == 2
    stats = daemon.wait_stats(unique_processed=8, rejected=2)
    assert stats["received"] == 8
    stored = {event["event_id"] for event in daemon.events()}
    assert stored == {f"r{i}" for i in range(10)} - {"r3", "r7"}

    # A publisher made from the daemon's config knows the limit and refuses such an event itself.
    with Publisher.from_config(daemon.config_path) as configured:
        assert configured.endpoint == daemon.ack
        with pytest.raises(InvalidEvent, match="over the limit of 200"):
            configured.publish(events[3])
        # Over 200 bytes as a whole but not in its payload: the library sends it, the daemon stores it.
        configured.publish(dict(make_event(10, 1, "r"), source="s" * 250))
        configured.flush(timeout=30)
    assert configured.totals.acked_new == 1


@pytest.mark.e2e
def test_publish_many_forms_the_batches_publish_forms_one_event_at_a_time(daemon: Daemon) -> None:
    """publish_many checks a whole call before it queues any: its batches must still be those
    publish() forms one event at a time, cut by batch_size and max_batch_bytes alone."""
    rng = random.Random(7)
    sizes = [rng.choice([0, 10, 200, 900, 2500]) for _ in range(400)]

    def events(prefix: str) -> list[dict[str, Any]]:
        return [{**make_event(i, 3, prefix), "payload": {"pad": "x" * size}} for i, size in enumerate(sizes)]

    def batches(publish: Callable[[Publisher, list[dict[str, Any]]], None], prefix: str) -> list[int]:
        # linger long and the window wide: only batch_size and max_batch_bytes decide the batches
        with Publisher(daemon.ack, batch_size=7, max_batch_bytes=3000, linger=60, window=1000) as publisher:
            publish(publisher, events(prefix))
            publisher.flush(timeout=30)
            return [result.size for result in sorted(publisher.results, key=lambda result: result.batch_id)]

    def one_by_one(publisher: Publisher, batch: list[dict[str, Any]]) -> None:
        for event in batch:
            publisher.publish(event)

    def in_calls(publisher: Publisher, batch: list[dict[str, Any]]) -> None:
        for start in range(0, len(batch), 13):
            publisher.publish_many(batch[start : start + 13])

    expected = batches(one_by_one, "one")
    assert batches(in_calls, "two") == expected  # prefixes of one length: the same sizes
    assert batches(lambda publisher, batch: publisher.publish_many(iter(batch)), "six") == expected
    assert len(set(expected)) > 2  # both bounds were met, and partial batches were sent
    # Events that fill max_batch_bytes exactly: the last of each three still joins its batch.
    same = [make_event(i, 3, "eq") for i in range(130, 190)]  # one packed size each
    (size,) = {len(msgpack.packb(event, use_bin_type=True)) for event in same}
    with Publisher(daemon.ack, batch_size=7, max_batch_bytes=3 * size, linger=60, window=1000) as publisher:
        publisher.publish_many(same)
        publisher.flush(timeout=30)
    assert [result.size for result in publisher.results] == [3] * 20
    daemon.wait_stats(unique_processed=1260)


@pytest.mark.e2e
def test_resends_and_repeats_are_acknowledged_as_duplicates(daemon: Daemon) -> None:
    events = [make_event(i, 3, "dup") for i in range(300)]
    with Publisher(daemon.ack, batch_size=50) as publisher:
        publisher.publish_many(events)
        publisher.flush(timeout=30)
        publisher.publish_many(events[:120])
    assert (publisher.totals.acked_new, publisher.totals.acked_duplicate) == (300, 120)
    daemon.wait_stats(unique_processed=300, duplicate_dropped=120)


@pytest.mark.e2e
def test_a_call_while_another_thread_is_inside_one_raises_and_nothing_is_lost(daemon: Daemon) -> None:
    """Two threads sharing one publisher's socket and pending batch lost events without a word."""
    inside = threading.Event()
    go_on = threading.Event()
    seen: list[int] = []

    def on_ack(result: Any) -> None:
        seen.append(result.new)
        if len(seen) == 1:
            publisher.publish(make_event(1, 1, "again"))  # a call from within a call, same thread
            inside.set()
            go_on.wait(10)

    publisher = Publisher(daemon.ack, on_ack=on_ack)
    publisher.publish(make_event(0, 1, "first"))
    flushing = threading.Thread(target=publisher.flush, args=(30,))
    flushing.start()
    try:
        assert inside.wait(10)
        for call in (
            lambda: publisher.publish(make_event(2, 1, "other")),
            lambda: publisher.publish_many([make_event(3, 1, "other")]),
            lambda: publisher.poll(),
            lambda: publisher.flush(1),
            lambda: publisher.close(1),
        ):
            with pytest.raises(PublisherInUse, match="a Publisher serves one thread at a time"):
                call()
    finally:
        go_on.set()
        flushing.join(30)
    # Taken in turn, any thread may use it.
    publisher.publish(make_event(4, 1, "later"))
    publisher.close(30)
    assert publisher.totals.acked_new == 3 and not flushing.is_alive()
    daemon.wait_stats(unique_processed=3)


@pytest.mark.e2e
def test_a_whole_batch_refused_by_the_daemon_raises_batch_refused(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("small", ingest={"max_batch_events": 5}).start()
    with Publisher(daemon.ack, batch_size=8) as publisher:
        with pytest.raises(BatchRefused, match="over the limit of 5") as caught:
            publisher.publish_many([make_event(i, 1, "big") for i in range(8)])
            publisher.flush(timeout=30)
        assert len(caught.value.events) == 8
    with Publisher.from_config(daemon.config_path, batch_size=8) as configured:
        assert configured.batch_size == 5
        configured.publish_many([make_event(i, 1, "big") for i in range(8)])
    assert configured.totals.acked_new == 8
    # The command reads the same limit from --config: before, fire-and-forget it sent one frame of
    # 50, refused whole, and said it had sent 50 (exit 0).
    sent = run_script("publish.py", "--config", str(daemon.config_path), "--events", "50", "--id-prefix", "cmd")
    assert sent.returncode == 0, sent.stderr
    eventually(lambda: daemon.request({"op": "stats"})["received"] == 8 + 50, 15, "the command's 50 events")
    too_big = run_script("publish.py", "--config", str(daemon.config_path), "--events", "5", "--batch", "6")
    assert too_big.returncode == 2 and "[ingest] max_batch_events (5)" in too_big.stderr, too_big.stderr
    assert daemon.request({"op": "stats"})["rejected"] == 1  # the first Publisher's batch of 8, alone


# publish.py with a planner that takes 2 s, as a stream of a few hundred thousand events does.
SLOW_PLANNING = (
    "import sys, time; import transport.commands.publish as p; planned = p.plan; "
    "p.plan = lambda *a, **k: (time.sleep(2), planned(*a, **k))[1]; sys.exit(p.main(sys.argv[1:]))"
)


@pytest.mark.e2e
def test_publish_gives_the_rate_of_its_sending_not_of_its_planning_too(daemon: Daemon) -> None:
    """200 events at --rate 200 take 1 s to send; with 2 s of planning counted in, the summary
    said about 67 events/s, a third of the rate kept."""
    flags = ["--endpoint", daemon.ingest, "--events", "200", "--rate", "200", "--json"]
    done = subprocess.run(
        [sys.executable, "-c", SLOW_PLANNING, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["sent"] == 200 and summary["elapsed_s"] >= 3, summary
    assert 150 <= summary["events_per_s"] <= 210, summary
    assert summary["sending_s"] < summary["elapsed_s"] - 1.5, summary


@pytest.mark.e2e
def test_publish_with_a_config_keeps_to_its_payload_limit(daemon_factory: Callable[..., Daemon]) -> None:
    """With [ingest] max_payload_bytes = 16, `publish --config` sent 20 events the daemon refused,
    and said it had sent them (exit 0); Publisher.from_config refuses such an event at once."""
    daemon = daemon_factory("tiny", ingest={"max_payload_bytes": 16}).start()
    sent = run_script("publish.py", "--config", str(daemon.config_path), "--events", "20")
    assert sent.returncode == 1 and "over the limit of 16" in sent.stderr + sent.stdout, (sent.stdout, sent.stderr)
    assert "[ingest] max_payload_bytes" in sent.stderr
    assert daemon.request({"op": "stats"})["rejected"] == 0  # nothing went out to be refused
    # Another refusal does not blame that limit: the event_id's is fixed.
    sent = run_script("publish.py", "--config", str(daemon.config_path), "--events", "1", "--id-prefix", "x" * 300)
    assert sent.returncode == 1 and "event_id must be 1-255 characters" in sent.stderr, sent.stderr
    assert "max_payload_bytes" not in sent.stderr, sent.stderr


@pytest.mark.e2e
def test_back_pressure_bounds_what_is_held_and_publish_times_out() -> None:
    publisher = Publisher(nowhere(), batch_size=5, window=2, ack_timeout=10.0, block_timeout=0.3)
    publisher.publish_many([make_event(i, 1, "bp") for i in range(15)])  # 2 batches out, 1 full pending
    assert publisher.in_flight == 2 and publisher.unacknowledged == 15
    started = time.monotonic()
    with pytest.raises(PublishTimeout, match="no room"):
        publisher.publish(make_event(15, 1, "bp"))
    assert time.monotonic() - started >= 0.3
    assert publisher.unacknowledged == 15  # the refused event was not queued: memory stays bounded
    with pytest.raises(PublishTimeout) as caught:
        publisher.publish_many([make_event(i, 1, "bp") for i in range(15, 18)], timeout=0.1)
    assert caught.value.queued == 0
    with pytest.raises(PublishTimeout, match="still unacknowledged"):
        publisher.flush(timeout=0.2)
    publisher.close(flush=False)
    with pytest.raises(PublisherClosed):
        publisher.publish(make_event(0, 1, "bp"))


@pytest.mark.e2e
def test_linger_sends_a_partial_batch_and_poll_collects_its_ack(daemon: Daemon) -> None:
    with Publisher(daemon.ack, batch_size=100, linger=0.05) as publisher:
        publisher.publish(make_event(0, 1, "lg"))
        assert publisher.in_flight == 0  # waiting for more events
        time.sleep(0.1)
        publisher.poll()
        assert publisher.in_flight == 1  # the linger ended: sent alone
        eventually(lambda: not publisher.poll(0.5), 30, "the lone event's ack")
        assert publisher.totals.acked_new == 1


def nested(depth: int) -> dict[str, Any]:
    """A payload nesting ``depth`` levels, its own map counting as one."""
    inner: list[Any] = []
    for _ in range(depth - 2):
        inner = [inner]
    return {"a": inner}


@pytest.mark.e2e
def test_a_payload_too_deep_is_refused_before_it_can_take_a_fire_and_forget_frame_down(daemon: Daemon) -> None:
    # The daemon refuses a payload over 1021 levels alone, but one a level or two deeper passes
    # the frame's own limit, and the whole frame, its other events with it, was refused.
    with Publisher(daemon.ingest, acked=False) as publisher:
        for depth in (1022, 1023):
            with pytest.raises(InvalidEvent, match="more than 1021 levels deep"):
                publisher.publish({**make_event(depth, 1, "deep"), "payload": nested(depth)})
        publisher.publish_many([make_event(0, 1, "deep"), {**make_event(1, 1, "deep"), "payload": nested(1021)}])
    daemon.wait_stats(unique_processed=2, rejected=0)


def exit_without_close(endpoint: str) -> subprocess.CompletedProcess[str]:
    """A program that sends 10 events fire-and-forget to ``endpoint`` and ends without close()."""
    code = (
        "from transport.publisher import Publisher\n"
        "from transport.workload import make_event\n"
        f"p = Publisher({endpoint!r}, acked=False, close_timeout=2)\n"
        "p.publish_many([make_event(i, 1, 'unclosed') for i in range(10)])\n"
        "p.flush()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


@pytest.mark.e2e
def test_a_fire_and_forget_publisher_dropped_without_close_says_what_no_daemon_took(daemon: Daemon) -> None:
    # Silent before: it lingered close_timeout at exit, then dropped what it had sent.
    lost = exit_without_close(nowhere())
    assert lost.returncode == 0, lost.stderr
    assert "was dropped without close(), and no daemon took its connection" in lost.stderr, lost.stderr
    assert "the 10 events it sent are lost" in lost.stderr
    delivered = exit_without_close(daemon.ingest)
    assert delivered.returncode == 0 and "dropped without close()" not in delivered.stderr, delivered.stderr
    daemon.wait_stats(unique_processed=10)


@pytest.mark.e2e
def test_fire_and_forget_delivers_everything_queued_when_closed(daemon: Daemon) -> None:
    with Publisher(daemon.ingest, acked=False, batch_size=64) as publisher:
        publisher.publish_many(plan(5000, 0.0, 4, 1, "ff"))
        publisher.publish(make_event(99_999, 1, "single"))
    assert publisher.totals.sent == 5001
    daemon.wait_stats(unique_processed=5001)


@pytest.mark.e2e
def test_from_config_picks_the_endpoint_of_the_mode(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory("cfg")
    with (
        Publisher.from_config(daemon.config_path) as acked,
        Publisher.from_config(daemon.config_path, acked=False) as pushed,
    ):
        assert (acked.endpoint, acked.acked) == (daemon.ack, True)
        assert (pushed.endpoint, pushed.acked) == (daemon.ingest, False)


@pytest.mark.e2e
def test_a_publisher_used_in_a_forked_child_refuses_at_once_and_the_parents_goes_on(daemon: Daemon) -> None:
    # The child's copy of the parent's socket is not usable: publish() used to spin for ever.
    code = (
        "import os, sys\n"
        "from transport.publisher import Publisher, PublisherClosed\n"
        "from transport.workload import make_event\n"
        f"p = Publisher({daemon.ack!r})\n"
        "p.publish(make_event(0, 1, 'parent'))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        p.publish(make_event(1, 1, 'child'))\n"
        "    except PublisherClosed as exc:\n"
        "        print('refused:', exc)\n"
        "    p.close()\n"
        f"    with Publisher({daemon.ack!r}) as own:\n"
        "        own.publish(make_event(2, 1, 'child'))\n"
        "    sys.exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "p.publish(make_event(3, 1, 'parent'))\n"
        "p.close(10)\n"
        "print('parent acked', p.totals.acked_new)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "refused: this publisher" in result.stdout and "made before this process was forked" in result.stdout
    assert "parent acked 2" in result.stdout
    daemon.wait_stats(unique_processed=3)


@pytest.mark.e2e
def test_a_publisher_dropped_in_a_reference_cycle_is_collected_without_hanging() -> None:
    # pyzmq's Context.__del__ would terminate the context while the socket is still open and
    # block for ever; the publisher's finalizer closes the socket first.
    code = (
        "import gc, sys\n"
        "from transport.publisher import Publisher\n"
        f"p = Publisher({nowhere()!r})\n"
        "p.cycle = p\n"
        "del p\n"
        "gc.collect()\n"
        "print('collected')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "collected" in result.stdout, result.stderr


@pytest.mark.e2e
def test_closing_a_fire_and_forget_publisher_no_daemon_ever_took_says_so() -> None:
    publisher = Publisher(nowhere(), acked=False)
    publisher.publish_many(plan(10, 0.0, 1, 1, "lost"))
    started = time.monotonic()
    with pytest.raises(
        PublishTimeout, match=r"no daemon at .* took a connection within 0.5 s of closing: the 10 events"
    ):
        publisher.close(timeout=0.5)
    assert time.monotonic() - started < 5
    with Publisher(nowhere(), acked=False) as idle:  # nothing sent, nothing to say
        assert idle.totals.sent == 0


@pytest.mark.e2e
def test_a_fire_and_forget_close_with_a_full_queue_and_no_daemon_says_all_was_lost_within_its_timeout() -> None:
    # It took twice its timeout and said "1 events not acknowledged": the 1000 frames ZeroMQ
    # held for a peer that never came were dropped without a word.
    publisher = Publisher(nowhere(), acked=False, batch_size=1, block_timeout=0.3)
    with pytest.raises(PublishTimeout):
        publisher.publish_many(plan(2000, 0.0, 1, 1, "full"))  # ZeroMQ's queue holds 1000 frames
    sent = publisher.totals.sent
    started = time.monotonic()
    with pytest.raises(PublishTimeout) as caught:
        publisher.close(timeout=1.0)
    assert time.monotonic() - started < 1.8
    assert f"the {sent} events sent are dropped with the socket; the 1 not yet sent are in this error's" in str(
        caught.value
    )
    assert len(caught.value.events) == 1


@pytest.mark.e2e
def test_leaving_a_with_block_by_an_exception_raises_that_exception_not_the_close_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The block's KeyError came out as PublishTimeout after close_timeout (30 s by default),
    # and Ctrl-C waited as long, as PublishTimeout too.
    for raised, most_s in ((KeyError, 3.0), (KeyboardInterrupt, 0.5)):
        started = time.monotonic()
        with pytest.raises(raised), Publisher(nowhere(), close_timeout=1.0, ack_timeout=0.2) as publisher:
            publisher.publish(make_event(1, 1, "with"))
            raise raised("the application's own")
        assert time.monotonic() - started < most_s
    assert caplog.text.count("the publisher to tcp://127.0.0.1:") == 2, caplog.text
    assert "leaving by KeyboardInterrupt, the publisher to" in caplog.text and "dropped 1 events" in caplog.text


@pytest.mark.e2e
def test_fire_and_forget_frames_queued_while_the_daemon_is_down_arrive_when_it_starts(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory("ff-late")
    publisher = Publisher(daemon.ingest, acked=False, batch_size=50, close_timeout=30)
    try:
        publisher.publish_many(plan(500, 0.0, 2, 5, "q"))
        publisher.flush()
        assert publisher.totals.sent == 500  # queued in the PUSH socket: nobody is listening yet
        daemon.start()
    finally:
        publisher.close()  # lingers until the queued frames are out
    daemon.wait_stats(unique_processed=500)


@pytest.mark.e2e
def test_curve_from_keys_or_config_in_the_library_and_in_publish_py(
    daemon_factory: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    folder, authorized = tmp_path / "keys", tmp_path / "authorized"
    for args in (("server", str(folder)), ("client", "alice", str(folder), "--authorize", str(authorized))):
        made = run_script("keys.py", *args, timeout=30)
        assert made.returncode == 0, made.stderr
    server_key, alice = folder / "server.key", folder / "alice.key_secret"
    daemon = daemon_factory(
        "curve", security={"curve_secret_key": str(folder / "server.key_secret"), "authorized_keys": str(authorized)}
    )
    daemon.start(wait=False)
    hook = curve_client(server_key, alice)

    def ready() -> bool:  # the harness's own readiness check speaks plain text, which CURVE refuses
        with QueryClient(daemon.query, timeout=1.0, configure=hook) as client:
            try:
                return "error" not in client.request({"op": "health"})
            except NoAnswer:
                return False

    eventually(ready, 30, "the CURVE daemon answers health\n" + daemon.log())

    client_config = write_config(
        tmp_path / "client.toml",
        {
            "ingest": {"bind": daemon.ingest, "ack_bind": daemon.ack},
            "query": {"bind": daemon.query},
            "security": {"server_public_key": str(server_key), "client_certificate": str(alice)},
        },
    )
    with Publisher.from_config(client_config, deadline=20) as publisher:
        publisher.publish_many([make_event(i, 1, "cv") for i in range(100)])
    assert publisher.totals.acked_new == 100
    # The query client reads the same file, keys included (it took a Config and no keys before).
    with QueryClient.from_config(client_config, timeout=5.0) as client:
        assert client.call({"op": "stats"})["unique_processed"] >= 100

    result = run_script(
        "publish.py",
        "--endpoint",
        daemon.ack,
        "--acked",
        "--events",
        "300",
        "--processes",
        "2",
        "--server-key",
        str(server_key),
        "--client-cert",
        str(alice),
        "--id-prefix",
        "cvp",
        "--deadline",
        "20",
        "--json",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["acked_new"] == 300
    # Without keys the daemon refuses the handshake: the load generator says so, sends nothing, and fails.
    plain = run_script(
        "publish.py",
        "--endpoint",
        daemon.ack,
        "--acked",
        "--events",
        "10",
        "--deadline",
        "1",
        "--ack-timeout",
        "0.3",
        timeout=60,
    )
    assert plain.returncode == 1 and "took the connection but the security handshake failed" in plain.stderr


def test_close_hands_back_the_events_it_could_not_get_acknowledged() -> None:
    events = [make_event(i, 2, "cl") for i in range(30)]
    publisher = Publisher(nowhere(), batch_size=10, ack_timeout=0.2, deadline=None, close_timeout=0.5)
    publisher.publish_many(events)
    with pytest.raises(PublishTimeout) as caught:
        publisher.close()
    assert caught.value.events == events
    assert "publishing them again is safe" in str(caught.value)
    with pytest.raises(PublisherClosed):
        publisher.publish(events[0])


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_closing_a_fail_over_publisher_waits_for_a_silent_daemons_batches_to_go_elsewhere(
    daemon_factory: Callable[..., Daemon],
) -> None:
    silent, alive = daemon_factory("silent").start(), daemon_factory("alive").start()
    endpoints = [silent.ack, alive.ack]
    warm_up, events = plan(20, 0.0, 20, 3, "wu"), plan(200, 0.0, 20, 4, "fo")
    publisher = Publisher(
        endpoints=endpoints,
        batch_size=20,
        ack_timeout=0.5,
        deadline=3.0,
        close_timeout=1.0,
        backoff=Backoff(base=0.05, cap=0.2),
    )
    publisher.publish_many(warm_up)
    publisher.flush(20)  # both answered: their connections are up
    with stopped(silent):  # connected, answering nothing: what it was sent may have been stored
        publisher.publish_many(events)
        started = time.monotonic()
        publisher.close()  # waits past the deadline: the silent daemon's batches then go to the other
        assert time.monotonic() - started >= 1.0
    assert publisher.totals.acked_new == 220
    to_alive = 200 + sum(rendezvous_order(event["topic"], endpoints)[0] == alive.ack for event in warm_up)
    assert alive.wait_stats(unique_processed=to_alive)["unique_processed"] == to_alive


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_daemon_that_gave_its_events_up_is_passed_over_for_a_deadline_then_tried_again(
    daemon_factory: Callable[..., Daemon],
) -> None:
    silent, daemon = daemon_factory("silent").start(), daemon_factory("alive").start()
    publisher = Publisher(endpoints=[silent.ack, daemon.ack], batch_size=5, ack_timeout=0.3, deadline=1.5)
    topic = next(f"t{n}" for n in range(1000) if publisher.ranking(f"t{n}")[0] == silent.ack)
    publisher.publish(make_event(0, 1, "wu") | {"topic": topic})
    publisher.flush(20)  # its connection is up
    count = 0

    def send() -> None:
        nonlocal count
        count += 1
        publisher.publish(make_event(count, 1, "po") | {"topic": topic})
        publisher.poll(0.02)

    with stopped(silent):  # connected, answering nothing: what it was sent waits for its deadline
        try:
            while publisher.totals.abandoned == 0:  # its first events wait for the silent daemon's deadline
                send()
            gave_up = time.monotonic()
            # Once it gave up it holds nothing, yet it is not taken for answering again: its topic's
            # events go to the other daemon for a whole deadline (before, at once: each such round
            # held a failover_after of events for a deadline).
            while time.monotonic() - gave_up < 1.2:
                send()
                assert publisher.route(topic) == daemon.ack
            while publisher.route(topic) != silent.ack:  # then it is tried again
                assert time.monotonic() - gave_up < 5
                send()
            publisher.flush(timeout=20)
        finally:
            publisher.close(timeout=20)
    assert publisher.totals.acked_new == count + 1
    assert daemon.wait_stats(unique_processed=count)["unique_processed"] == count


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_what_a_daemon_never_connected_holds_goes_at_once_to_one_that_is_up(daemon: Daemon) -> None:
    """Nothing listens at one endpoint (connection refused): its batches waited for their whole
    deadline before going to the daemon that is up, though it cannot have received any of them."""
    dead = nowhere()
    events = plan(2000, 0.0, 20, 12, "nc")
    publisher = Publisher(endpoints=[dead, daemon.ack], deadline=20.0)
    assert sum(publisher.ranking(event["topic"])[0] == dead for event in events) > 200
    started = time.monotonic()
    try:
        publisher.publish_many(events)
        publisher.flush(timeout=10)
        took = time.monotonic() - started
    finally:
        publisher.close(timeout=0, flush=False)
    assert took < 3, took
    totals = publisher.totals
    assert (totals.sent, totals.acked_new, totals.acked_duplicate, totals.abandoned) == (2000, 2000, 0, 0), totals
    stats = daemon.wait_stats(unique_processed=2000)
    assert (stats["received"], stats["duplicate_dropped"]) == (2000, 0)  # none sent twice


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_what_a_daemon_gone_down_never_got_goes_at_once_to_one_that_is_up_and_its_topics_come_back(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """A daemon stopped (its port now refuses connections): what is published after goes to the
    other daemon at once, not after failover_after then a deadline; started again, it gets its
    topics back."""
    gone, alive = daemon_factory("gone").start(), daemon_factory("alive").start()
    endpoints = [gone.ack, alive.ack]
    warm_up, events = plan(20, 0.0, 20, 13, "wu"), plan(1000, 0.0, 20, 14, "gd")
    to_gone = sum(rendezvous_order(event["topic"], endpoints)[0] == gone.ack for event in warm_up)
    publisher = Publisher(endpoints=endpoints, deadline=20.0)
    try:
        publisher.publish_many(warm_up)
        publisher.flush(timeout=10)  # both answered: their connections are up
        gone.terminate()
        started = time.monotonic()
        publisher.publish_many(events)
        publisher.flush(timeout=10)
        assert time.monotonic() - started < 3
        assert alive.wait_stats(unique_processed=1020 - to_gone)["duplicate_dropped"] == 0
        gone.start()
        topic = next(event["topic"] for event in warm_up if rendezvous_order(event["topic"], endpoints)[0] == gone.ack)
        eventually(lambda: publisher.route(topic) == gone.ack, 10, "the daemon back takes its topics again")
    finally:
        publisher.close(timeout=0, flush=False)
    totals = publisher.totals
    assert (totals.sent, totals.acked_new, totals.abandoned) == (1020, 1020, 0), totals


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_daemon_back_after_losing_a_batch_gets_its_topics_back_during_a_long_publish(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """A daemon killed with a batch it never read, three times, each time started again, while the
    application only calls publish(): its publisher's Lazy Pirate retry must still run (publish
    serviced only the daemon it queued on, so the passed-over daemon's lost batch waited,
    unanswered, until the final flush, and its topics stayed on the other daemon all along)."""
    flapping, alive = daemon_factory("flapping").start(), daemon_factory("alive").start()
    endpoints = [flapping.ack, alive.ack]
    publisher = Publisher(endpoints=endpoints, batch_size=10, ack_timeout=2.0, deadline=60.0)
    topic = next(f"topic-{n}" for n in range(20) if rendezvous_order(f"topic-{n}", endpoints)[0] == flapping.ack)
    count = 0

    def publish_for(seconds: float, until: Callable[[], bool] = lambda: False) -> bool:
        nonlocal count
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            publisher.publish(make_event(count, 20, "fl"))
            count += 1
            if count % 20 == 0:
                time.sleep(0.005)
            if until():
                return True
        return False

    try:
        for _ in range(3):
            publish_for(0.3)
            publisher.flush(timeout=20)  # both answered: their connections are up
            assert flapping.proc is not None
            os.kill(flapping.proc.pid, signal.SIGSTOP)  # the batch below reaches its kernel, never the daemon
            publisher.publish(make_event(count, 1, "lost") | {"topic": topic})
            count += 1
            publisher.poll(0.1)  # sent (the connection is up), then the daemon is gone with it
            flapping.kill()
            publish_for(0.5)
            flapping.start()
            publish_for(2.5)  # past failover_after: the lost batch has been waiting too long
            back = publish_for(8.0, until=lambda: publisher.route(topic) == flapping.ack)
            assert back, "the daemon back never got its topic back while publish() went on"
        publisher.flush(timeout=20)
    finally:
        publisher.close(timeout=0, flush=False)
    totals = publisher.totals
    # Each event acknowledged once: batches sent to the daemon back before the retry are resent
    # with the lost one (their replies went with the old socket), and come back as duplicates.
    assert (totals.sent, totals.acked_new + totals.acked_duplicate, totals.abandoned) == (count, count, 0), totals
    # At least one recovery for each lost batch; more where the daemon back was slow to start
    # (a loaded machine) and an attempt timed out before it listened.
    assert totals.retries >= 3, totals
    stored = [(e["topic"], e["event_id"]) for daemon in (flapping, alive) for e in daemon.events()]
    assert len(stored) == len(set(stored)) == count


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_what_a_daemon_found_down_holds_reaches_the_next_daemon_before_the_topics_later_events(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """An event waiting in a daemon's partial batch when it dies, then the topic's next events: those
    went to the other daemon at once, the first up to 50 ms later (the next look for events to
    move), so that daemon stored the topic's events out of order."""
    gone, alive = daemon_factory("gone").start(), daemon_factory("alive", ordering={"window_ms": 0}).start()
    publisher = Publisher(endpoints=[gone.ack, alive.ack], batch_size=50, deadline=20.0)
    topic = next(f"t{n}" for n in range(1000) if publisher.ranking(f"t{n}")[0] == gone.ack)

    def event(n: int) -> dict[str, Any]:
        return {"topic": topic, "event_id": f"e{n}", "timestamp": "2025-10-22T10:00:00Z", "source": "test"}

    try:
        publisher.publish(event(0) | {"event_id": "warm-up"})
        publisher.flush(timeout=10)  # its connection is up
        publisher.publish(event(0))  # waits in its partial batch for the linger
        gone.kill()
        for n in range(1, 5):
            time.sleep(0.01)  # each partial batch leaves by its linger
            publisher.publish(event(n))
        publisher.flush(timeout=10)
    finally:
        publisher.close(timeout=0, flush=False)
    assert alive.wait_stats(unique_processed=5)["duplicate_dropped"] == 0
    assert [event["event_id"] for event in alive.events(topic)] == [f"e{n}" for n in range(5)]  # arrival order


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_publish_acked_with_one_endpoint_refusing_takes_seconds_not_the_deadline(daemon: Daemon) -> None:
    result = run_script(
        "publish.py",
        *("--endpoint", nowhere(), "--endpoint", daemon.ack, "--acked", "--events", "1000", "--topics", "20"),
        *("--deadline", "20", "--json"),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["elapsed_s"] < 5, summary
    assert (summary["sent"], summary["acked_new"], summary["unacked"]) == (1000, 1000, 0), summary
    assert daemon.wait_stats(unique_processed=1000)["duplicate_dropped"] == 0


@pytest.mark.e2e
def test_a_refused_batch_loses_no_event_of_publish_many_or_of_close(daemon_factory: Callable[..., Daemon]) -> None:
    # Batches of 11 to a daemon that takes 10: each is refused whole. Every event must end up
    # handed back in an exception (or stored), none dropped in silence.
    daemon = daemon_factory(ingest={"max_batch_events": 10}).start()
    events = plan(100, 0.0, 4, 5, "br")
    publisher = Publisher(daemon.ack, batch_size=11, window=1, linger=60, ack_timeout=5)
    handed_back: list[dict[str, Any]] = []
    try:
        publisher.publish_many(events)
    except BatchRefused as exc:
        handed_back.extend(exc.events)  # the refused batch's, and every event not queued
    try:
        publisher.close()
    except BatchRefused as exc:
        handed_back.extend(exc.events)
    ids = sorted(event["event_id"] for event in handed_back)
    assert ids == sorted(event["event_id"] for event in events), (len(ids), len(events))
    assert daemon.stats()["unique_processed"] == 0


def test_a_fail_over_publisher_with_every_daemon_down_gives_up_and_hands_every_event_back() -> None:
    publisher = Publisher(
        endpoints=[nowhere(), nowhere()], ack_timeout=0.2, deadline=1.0, window=1, batch_size=10, close_timeout=1
    )
    published: list[dict[str, Any]] = []
    handed_back: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for event in plan(41, 0.0, 3, 6, "dead"):
            published.append(event)
            publisher.publish(event)
        publisher.flush()
    except DeliveryFailed as exc:
        handed_back.extend(exc.events)
    took = time.monotonic() - started
    held = publisher.unacknowledged  # queued on a daemon after the others gave up: still held
    publisher.close(flush=False)
    assert took < 20, took
    assert len(handed_back) + held == len(published), (len(handed_back), held, len(published))
    assert len({e["event_id"] for e in handed_back}) == len(handed_back)


def publisher_to_nowhere(endpoints: int, deadline: float) -> Publisher:
    """A publisher to one daemon, or a fail-over one to two, none of which answers."""
    targets = [nowhere() for _ in range(endpoints)]
    where: dict[str, Any] = {"endpoints": targets} if endpoints > 1 else {"endpoint": targets[0]}
    return Publisher(**where, batch_size=2, window=1, ack_timeout=0.3, deadline=deadline)


@pytest.mark.parametrize("endpoints", [1, 2], ids=["one daemon", "fail-over"])
def test_publish_many_that_fails_hands_back_every_event_it_did_not_deliver(endpoints: int) -> None:
    events = plan(40, 0.0, 4, 8, "many")
    publisher = publisher_to_nowhere(endpoints, deadline=1.0)
    with pytest.raises(DeliveryFailed) as failed:
        publisher.publish_many(events)
    held = publisher.unacknowledged
    publisher.close(flush=False)
    handed_back = [event["event_id"] for event in failed.value.events]
    assert len(set(handed_back)) == len(handed_back)
    assert len(handed_back) + held == len(events), (len(handed_back), held)


@pytest.mark.parametrize("endpoints", [1, 2], ids=["one daemon", "fail-over"])
def test_publish_many_that_times_out_says_how_many_it_queued(endpoints: int) -> None:
    events = plan(40, 0.0, 4, 9, "slow")
    publisher = publisher_to_nowhere(endpoints, deadline=30.0)
    with pytest.raises(PublishTimeout) as timed_out:
        publisher.publish_many(events, timeout=0.5)
    held = publisher.unacknowledged
    publisher.close(timeout=0, flush=False)
    # Republishing events[queued:] must send none twice: the publisher holds exactly the first ones.
    assert 0 < timed_out.value.queued == held < len(events), (timed_out.value.queued, held)


def test_a_fail_over_publisher_refuses_a_batch_with_a_bad_event_whole() -> None:
    events = plan(10, 0.0, 2, 7, "ok")
    with Publisher(endpoints=[nowhere(), nowhere()], close_timeout=0.1) as publisher:
        with pytest.raises(InvalidEvent, match="event 5: "):
            publisher.publish_many([*events[:5], {"topic": "t"}, *events[5:]])
        assert publisher.unacknowledged == 0  # none queued, as a plain Publisher does


@pytest.mark.parametrize("ack_timeout", [5.0, 0.4], ids=["deadline within one wait", "deadline after retries"])
def test_the_deadline_is_kept_whatever_the_ack_timeout(ack_timeout: float) -> None:
    """Given up when the oldest batch has gone ``deadline`` seconds, not when the last attempt's
    ``ack_timeout`` ends (up to 5 s later with the defaults)."""
    publisher = Publisher(nowhere(), deadline=1.0, ack_timeout=ack_timeout, batch_size=1)
    started = time.monotonic()
    with pytest.raises(DeliveryFailed) as failed:
        publisher.publish(make_event(0, 1, "late"))
        publisher.flush(timeout=10)
    took = time.monotonic() - started
    publisher.close(flush=False)
    assert 1.0 <= took < 1.6, took
    assert len(failed.value.events) == 1 and 1.0 <= failed.value.elapsed < 1.6, failed.value.elapsed


def test_a_tuple_map_key_is_refused_at_once_and_everything_else_packs_as_plain_msgpack_does() -> None:
    import collections
    import enum

    class Colour(str, enum.Enum):  # noqa: UP042 (the mixin, whose str() is not its value)
        RED = "red"

    class Size(enum.IntEnum):
        BIG = 5

    base = {"topic": "t", "event_id": "k", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}
    plain = msgpack.Packer(use_bin_type=True, datetime=False)
    publisher = Publisher(nowhere(), acked=False, close_timeout=0)
    try:
        # Small payloads too (the depth check decodes only long ones): once sent fire-and-forget
        # and dropped by the daemon without a word.
        for payload in ({(1, 2): "x"}, {"a": [{"b": {(1,): 2}}]}):
            with pytest.raises(InvalidEvent, match="map whose key is an array or a map"):
                publisher.publish({**base, "payload": payload})
        with pytest.raises(InvalidEvent, match="a map key is a msgpack Timestamp"):
            publisher.publish({**base, "payload": {"a": {msgpack.Timestamp(1, 0): 1}}})
        for payload in (
            {"tuple": (1, 2), "nested": [(3, {"k": (4,)})]},
            collections.OrderedDict(a=1),
            collections.defaultdict(int, a=2),
            {"colour": Colour.RED, "size": Size.BIG, "big": 2**63, "none": None, "yes": True},
            {"float": type("F", (float,), {})(1.5), "list": type("L", (list,), {})([1, 2])},
            {"bytes": b"ab", "bytearray": bytearray(b"cd"), "ext": msgpack.ExtType(3, b"x")},
        ):
            event = {**base, "payload": payload}
            assert publisher._encode(event) == plain.pack(event), payload  # the bytes the daemon stores
        assert publisher.unacknowledged == 0
    finally:
        publisher.close(timeout=0, flush=False)


@contextlib.contextmanager
def on_alarm(call: Callable[[], Any], after: float) -> Iterator[None]:
    """Run ``call`` in a SIGALRM handler ``after`` seconds in (on this, the main thread)."""
    previous = signal.signal(signal.SIGALRM, lambda *_: call())
    signal.setitimer(signal.ITIMER_REAL, after)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def stopped(daemon: Daemon) -> Iterator[None]:
    """The daemon SIGSTOPped (it takes connections but answers nothing) for the block."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_close_from_on_ack_ends_the_flush_with_publisher_closed_and_the_rest_held(daemon: Daemon) -> None:
    """close() from on_ack during flush() pulled the socket from under the flush reading replies:
    a raw AttributeError, and the events not acknowledged told nowhere."""
    results: list[BatchResult] = []

    def on_ack(result: BatchResult) -> None:
        results.append(result)
        publisher.close()

    # window 1: the second batch waits for the first's ack, when the flush is asked to stop.
    publisher = Publisher(daemon.ack, batch_size=5, window=1, linger=60, on_ack=on_ack)
    events = [make_event(i, 1, "ca") for i in range(10)]
    publisher.publish_many(events)
    started = time.monotonic()
    with pytest.raises(PublisherClosed, match="was closed during this call") as caught:
        publisher.flush(timeout=20)
    assert time.monotonic() - started < 5
    assert [result.size for result in results] == [5] and publisher.totals.acked_new == 5
    assert caught.value.events == events[5:] == publisher.held_events()  # not acknowledged: told so
    assert publisher._resources.socket is None and not publisher._finalizer.alive  # freed, once
    publisher.close()  # closing again is harmless
    with pytest.raises(PublisherClosed, match="is closed"):
        publisher.publish(make_event(10, 1, "ca"))
    # The last ack's on_ack closing: the flush's work is done, so it returns.
    done = Publisher(daemon.ack, on_ack=lambda result: done.close())
    done.publish_many([make_event(i, 1, "cb") for i in range(3)])
    done.flush(timeout=20)
    assert done.totals.acked_new == 3 and done.held_events() == [] and not done._finalizer.alive
    # From on_ack during publish(): the event queued is not sent, and said so.
    during = Publisher(daemon.ack, batch_size=1, window=1, on_ack=lambda result: during.close())
    during.publish_many([make_event(0, 1, "cc"), make_event(1, 1, "cc")])  # one sent, one waiting for room
    late = make_event(2, 1, "cc")
    with pytest.raises(PublisherClosed, match="was closed during this call") as caught:
        during.publish(late)  # waits for room: the first ack comes, and closes
    assert caught.value.events[-1] == late == during.held_events()[-1] and not during._finalizer.alive


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_close_from_a_signal_handler_during_flush_ends_it_at_once(daemon: Daemon) -> None:
    """A SIGINT-style handler calling close() while flush() waited on a daemon that did not answer
    broke the flush with a raw ZMQError (its socket closed under its poll)."""
    publisher = Publisher(daemon.ack, ack_timeout=10)
    first = [make_event(i, 1, "sig") for i in range(5)]
    publisher.publish_many(first)
    publisher.flush(timeout=20)
    later = [make_event(i, 1, "sig") for i in range(5, 10)]
    with stopped(daemon):
        publisher.publish_many(later)
        started = time.monotonic()
        with on_alarm(publisher.close, 0.3), pytest.raises(PublisherClosed, match="closed during this call") as caught:
            publisher.flush(timeout=20)
        assert time.monotonic() - started < 2
    assert caught.value.events == later == publisher.held_events()
    assert publisher.totals.acked_new == 5 and sum(result.size for result in publisher.results) == 5
    assert not publisher._finalizer.alive
    # A publish waiting for room: the event it did not queue is handed back with the others.
    waiting = Publisher(daemon.ack, batch_size=5, window=1, linger=60, ack_timeout=10)
    held = [make_event(i, 1, "room") for i in range(10)]  # one batch sent, one waiting for room
    with stopped(daemon):
        waiting.publish_many(held)
        late = make_event(10, 1, "room")
        with on_alarm(waiting.close, 0.3), pytest.raises(PublisherClosed, match="closed during this call") as caught:
            waiting.publish(late, timeout=20)
    assert caught.value.events == [*held, late] and waiting.held_events() == held


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_flush_waits_for_what_on_ack_publishes_meanwhile(daemon_factory: Callable[..., Daemon]) -> None:
    """An AffinePublisher's flush returned once each daemon's publisher had been flushed in turn,
    though an on_ack had since published to one flushed earlier; a Publisher's waits (both must)."""
    first, second = daemon_factory("first").start(), daemon_factory("second").start()
    endpoints = [first.ack, second.ack]
    topic_of = {
        endpoint: next(f"t{n}" for n in range(100) if rendezvous_order(f"t{n}", endpoints)[0] == endpoint)
        for endpoint in endpoints
    }
    follow_ups = [make_event(i, 1, "follow") for i in range(3)]

    def chained(publisher: Publisher, topic: str) -> Callable[[BatchResult], None]:
        def on_ack(result: BatchResult) -> None:
            if follow_ups:
                publisher.publish({**follow_ups.pop(0), "topic": topic})

        return on_ack

    single = Publisher(first.ack, on_ack=lambda result: on_ack_single(result))
    on_ack_single = chained(single, "single")
    single.publish({**make_event(9, 1, "lead"), "topic": "single"})
    single.flush(timeout=20)
    assert not follow_ups and single.unacknowledged == 0 and single.totals.acked_new == 4

    follow_ups.extend(make_event(i, 1, "again") for i in range(3))
    affine = Publisher(endpoints=endpoints, on_ack=lambda result: on_ack_affine(result))
    # The lead goes to the second daemon, whose on_ack publishes to the first, flushed before it.
    on_ack_affine = chained(affine, topic_of[first.ack])
    affine.publish({**make_event(9, 1, "lead"), "topic": topic_of[second.ack]})
    try:
        affine.flush(timeout=20)
        assert not follow_ups and affine.unacknowledged == 0 and affine.totals.acked_new == 4
    finally:
        affine.close(timeout=5)
        single.close(timeout=5)


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_an_on_ack_failure_in_close_still_settles_and_frees_everything_then_raises(daemon: Daemon) -> None:
    """An on_ack that raised inside close() stopped its flush: the batches still in flight stayed
    in held_events() for good (never settled, the socket gone)."""
    seen: list[BatchResult] = []

    def on_ack(result: BatchResult) -> None:
        seen.append(result)
        if len(seen) == 1:
            raise RuntimeError("the application's on_ack failed")

    publisher = Publisher(daemon.ack, batch_size=5, on_ack=on_ack)
    publisher.publish_many([make_event(i, 1, "cf") for i in range(20)])  # four batches in flight
    with pytest.raises(RuntimeError, match="the application's on_ack failed"):
        publisher.close(timeout=20)
    assert publisher.held_events() == [] and publisher.totals.acked_new == 20
    assert len(seen) == 4  # the others were told too
    assert not publisher._finalizer.alive
    daemon.wait_stats(unique_processed=20)


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_close_from_on_ack_during_close_lets_that_close_flush_everything(daemon_factory: Callable[..., Daemon]) -> None:
    """close() from on_ack while close() itself flushed stopped that flush at the first ack: the
    close raised PublisherClosed and handed back events a running daemon was about to take."""
    daemon, second = daemon_factory("one").start(), daemon_factory("two").start()
    acks: list[int] = []

    def on_ack(result: BatchResult) -> None:
        acks.append(result.size)
        publisher.close()  # "done with it": already closing, so nothing to add

    publisher = Publisher(daemon.ack, batch_size=5, window=8, on_ack=on_ack)
    publisher.publish_many([make_event(i, 1, "cwc") for i in range(20)])
    publisher.close(timeout=20)
    assert acks == [5, 5, 5, 5] and publisher.totals.acked_new == 20 and publisher.held_events() == []
    assert not publisher._finalizer.alive
    # The same through several daemons.
    affine = Publisher(endpoints=[daemon.ack, second.ack], batch_size=5, window=8, on_ack=lambda _: affine.close())
    affine.publish_many([make_event(i, 1, f"cwd{i % 4}") for i in range(20)])
    affine.close(timeout=20)
    assert affine.totals.acked_new == 20 and affine.held_events() == []


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_a_publish_from_on_ack_after_a_close_asked_ends_the_call_with_every_event_held(daemon: Daemon) -> None:
    """An on_ack publishing after close() was asked in the call (by itself, or a signal handler
    just before) raised "is closed; make a new one" with no events out of that call: the events
    held, and the one on_ack published, were in no error's .events."""
    follow_up = make_event(100, 1, "fu")

    def on_ack(result: BatchResult) -> None:
        publisher.close()
        publisher.publish(follow_up)

    publisher = Publisher(daemon.ack, batch_size=5, window=1, linger=60, on_ack=on_ack)
    events = [make_event(i, 1, "fo") for i in range(10)]
    publisher.publish_many(events)  # the first batch sent, the second waiting for its ack
    with pytest.raises(PublisherClosed, match="was closed during this call") as caught:
        publisher.flush(timeout=20)
    assert caught.value.events == [*events[5:], follow_up]
    assert publisher.held_events() == events[5:] and not publisher._finalizer.alive
    with pytest.raises(PublisherClosed, match="is closed; make a new one") as later:
        publisher.publish(follow_up)
    assert later.value.events == []
    # publish_many from on_ack, through several daemons.
    many = [make_event(200 + i, 1, "fm") for i in range(3)]
    affine = Publisher(
        endpoints=[daemon.ack, nowhere()], batch_size=5, window=1, linger=60, on_ack=lambda _: on_ack_many()
    )

    def on_ack_many() -> None:
        affine.close()
        affine.publish_many(iter(many))

    topic = next(t for t in (f"fa{i}" for i in range(50)) if rendezvous_order(t, affine.endpoints)[0] == daemon.ack)
    sent = [{**make_event(i, 1, "fa"), "topic": topic} for i in range(10)]
    affine.publish_many(sent)
    with pytest.raises(PublisherClosed, match="was closed during this call") as caught:
        affine.flush(timeout=20)
    assert caught.value.events == [*sent[5:], *many]


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_publish_giving_up_tells_its_user_what_to_check_not_an_exception_attribute(daemon: Daemon) -> None:
    """The command printed DeliveryFailed's own words: "N unacknowledged events are in this
    exception's .events", which a command's user cannot reach (and N matched no figure shown)."""
    flags = ["--endpoint", daemon.ack, "--acked", "--events", "3000", "--rate", "1000", "--deadline", "2"]
    command = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[1] / "scripts" / "publish.py"), *flags, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    eventually(lambda: daemon.stats()["received"] > 0 or None, 20, "the first events received")
    with stopped(daemon):
        out, err = command.communicate(timeout=30)
    summary = json.loads(out.splitlines()[-1])
    assert command.returncode == 1 and summary["unacked"] > 0, (out, err)
    (error,) = summary["errors"]
    assert ".events" not in error and "Running the same command again is safe" in error, error
    assert f"no acknowledgement from {daemon.ack}" in error, error


@pytest.mark.timeout(60)
def test_a_fire_and_forget_publisher_still_sends_after_thousands_of_reconnections() -> None:
    """A fire-and-forget publisher's monitor tells close() whether a daemon ever took the
    connection, and nothing read it before: each reconnection added an event, and at about
    2 000 (a daemon restarted that often, a network that cuts idle connections) libzmq's I/O
    thread blocked on the full monitor, which stopped the publisher for good: its frames queued,
    then each publish waited for ever. Here a PULL socket that takes frames of 1 KiB at most, as
    the daemon's ingest socket takes [ingest] max_message_bytes, cuts the connection at each
    batch too big, and the publisher reconnects after 1 ms."""
    context: zmq.Context[Any] = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.MAXMSGSIZE, 1024)
    handshakes = pull.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    publisher = Publisher(
        endpoint, acked=False, batch_size=1, block_timeout=0, configure=lambda s: s.setsockopt(zmq.RECONNECT_IVL, 1)
    )
    taken = 0
    try:
        started = time.monotonic()
        while taken < 3000 and time.monotonic() - started < 20:
            with contextlib.suppress(PublishTimeout):  # its queue full: the connection is being made again
                publisher.publish(make_event(taken, 1, "big-", payload_bytes=2048))
            while handshakes.poll(1):
                handshakes.recv_multipart()
                taken += 1
        assert taken >= 3000, f"the publisher stopped reconnecting after {taken} handshakes"

        def small_one_arrives() -> bool:
            with contextlib.suppress(PublishTimeout):
                publisher.publish(make_event(0, 1, "small-"))
            return bool(pull.poll(100))

        eventually(small_one_arrives, 10, "a small event to arrive")  # once the big ones queued are gone
        assert msgpack.unpackb(pull.recv())["event_id"].startswith("small-")
    finally:
        publisher.close(timeout=0, flush=False)
        pull.disable_monitor()
        for sock in (pull, handshakes):
            sock.close(linger=0)
        context.term()
