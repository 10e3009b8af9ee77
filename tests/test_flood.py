"""Floods and oversized frames against a real daemon: everything counted, memory flat, no harm.

The flood test pushes 1 000 000 events of about 200-byte payloads from 4 processes as fast as
they can, while a thread samples the daemon's resident memory (VmRSS) every 100 ms. The bound
it asserts comes from measurement (see the report in docs/readme-security.md): the daemon's
credit (``[ingest] max_in_flight``) and the sockets' RCVHWM keep the backlog in the publishers.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import ROOT, Daemon, eventually, publish

pytestmark = pytest.mark.e2e  # every test here starts processes

FLOOD_EVENTS = 1_000_000
FLOOD_PROCESSES = 4
PAYLOAD_BYTES = 200
RSS_BOUND_MB = 400

# One publisher process: its slice of the events, ~200-byte payloads, 100 events per frame,
# pushed with blocking sends (so a full pipe slows it down), then flushed with a linger.
FLOOD_SCRIPT = r"""
import sys, time, msgpack, zmq
from transport.workload import make_event
endpoint, index, count, total, pad = sys.argv[1], *map(int, sys.argv[2:6])
mine = range(index, total, count)
frames = []
batch = []
for n in mine:
    batch.append(make_event(n, 50, "flood-", pad))
    if len(batch) == 100:
        frames.append(msgpack.packb(batch)); batch = []
if batch:
    frames.append(msgpack.packb(batch))
ctx = zmq.Context()
sock = ctx.socket(zmq.PUSH)
sock.setsockopt(zmq.SNDHWM, 100)
sock.connect(endpoint)
started = time.perf_counter()
for frame in frames:
    sock.send(frame)
sock.close(linger=120_000)
ctx.term()
print(f"{len(mine)} {time.perf_counter() - started:.3f}")
"""


def rss_mb(pid: int) -> float:
    """The resident memory of ``pid`` in MB (from /proc/PID/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's VmRSS on a thread until stopped; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0.0
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = rss_mb(self.pid)
            except (OSError, RuntimeError):
                return
            self.samples.append(value)
            self.peak = max(self.peak, value)
            self._stop.wait(self.interval_s)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flood_is_counted_and_memory_stays_flat(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(storage={"path": "events.db", "synchronous": "OFF"}).start()
    assert daemon.proc is not None
    idle_rss = rss_mb(daemon.proc.pid)
    started = time.perf_counter()
    with RssSampler(daemon.proc.pid) as sampler:
        publishers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FLOOD_SCRIPT,
                    daemon.ingest,
                    str(i),
                    str(FLOOD_PROCESSES),
                    str(FLOOD_EVENTS),
                    str(PAYLOAD_BYTES),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(FLOOD_PROCESSES)
        ]
        try:
            outputs = [p.communicate(timeout=240) for p in publishers]
        finally:
            for p in publishers:
                if p.poll() is None:
                    p.kill()
        sent_s = time.perf_counter() - started
        for p, (_out, err) in zip(publishers, outputs):
            assert p.returncode == 0, err
        stats = daemon.wait_stats(timeout=120, received=FLOOD_EVENTS, unique_processed=FLOOD_EVENTS)
        stored_s = time.perf_counter() - started
    print(
        f"\nflood: {FLOOD_EVENTS:,} events from {FLOOD_PROCESSES} processes; all sent in {sent_s:.1f} s, "
        f"all committed in {stored_s:.1f} s ({FLOOD_EVENTS / stored_s:,.0f} events/s); "
        f"daemon RSS idle {idle_rss:.0f} MB, peak {sampler.peak:.0f} MB ({len(sampler.samples)} samples)"
    )
    assert stats["rejected"] == 0 and stats["duplicate_dropped"] == 0, stats
    assert sampler.peak < RSS_BOUND_MB, f"daemon RSS peaked at {sampler.peak:.0f} MB (bound {RSS_BOUND_MB} MB)"
    assert daemon.terminate() == 0, daemon.log()[-4000:]


def send_oversized(endpoint: str, kind: int, size: int) -> None:
    """Send one frame of ``size`` bytes from a fresh socket; close it once the daemon has dropped the connection."""
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(kind)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    try:
        sock.send(b"\x91" + b"\x00" * (size - 1), zmq.NOBLOCK)
        # The daemon reads the frame's size and hangs up: the frame has reached its socket.
        assert monitor.poll(30_000), f"the daemon kept the connection that sent a {size}-byte frame"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        context.term()


@pytest.mark.timeout(120)
def test_64_mib_frame_is_dropped_without_harm(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    assert daemon.proc is not None
    before = rss_mb(daemon.proc.pid)
    with RssSampler(daemon.proc.pid, interval_s=0.02) as sampler:
        send_oversized(daemon.ingest, zmq.PUSH, 64 * 1024 * 1024)
        send_oversized(daemon.ack, zmq.DEALER, 64 * 1024 * 1024)
        send_oversized(daemon.query, zmq.REQ, 64 * 1024 * 1024)
        health = daemon.request({"op": "health"})
    assert "error" not in health, health
    # ZMQ_MAXMSGSIZE makes libzmq drop the connection on reading the size, before allocating.
    assert sampler.peak - before < 32, f"RSS went from {before:.0f} to {sampler.peak:.0f} MB"
    stats = daemon.stats()
    assert stats["received"] == 0 and stats["rejected"] == 0, stats
    publish(daemon.ingest, "--events", "500", "--id-prefix", "after-")
    daemon.wait_stats(unique_processed=500)
    assert daemon.terminate() == 0, daemon.log()[-4000:]


@pytest.mark.timeout(120)
def test_limits_reject_with_a_reason(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(ingest={"max_batch_events": 10, "max_payload_bytes": 100}).start()
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.connect(daemon.ingest)
    ok = {"topic": "t", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}
    sock.send(msgpack.packb([{**ok, "event_id": f"b{i}"} for i in range(11)]))  # 11 > 10: refused whole
    sock.send(
        msgpack.packb(
            [
                {**ok, "event_id": "big", "payload": {"x": "y" * 200}},  # refused alone
                {**ok, "event_id": "small", "payload": {"x": "y"}},
            ]
        )
    )
    # A topic that is a list once killed the ingest thread (TypeError in the topic cache).
    sock.send(msgpack.packb([{**ok, "event_id": "odd", "topic": []}, {**ok, "event_id": "fine"}]))
    sock.close(linger=5000)
    context.term()
    daemon.wait_stats(rejected=3, unique_processed=2)
    log = daemon.log()
    assert "batch of 11 events is over the limit of 10" in log
    assert "payload is 205 bytes, over the limit of 100" in log
    assert daemon.terminate() == 0, daemon.log()[-4000:]


def answered_after(dealer: zmq.Socket[Any], event_id: str) -> tuple[dict[str, Any], float]:
    """Send one acknowledged one-event batch; its reply and how long it took (20 s at most)."""
    started = time.monotonic()
    event = {"topic": "acked", "event_id": event_id, "timestamp": "2025-10-22T10:00:00Z", "source": "s"}
    dealer.send(msgpack.packb({"batch": event_id, "events": [event]}))
    assert dealer.poll(20_000), "no acknowledgement within 20 s"
    reply: dict[str, Any] = msgpack.unpackb(dealer.recv())
    return reply, time.monotonic() - started


# A publisher pushing 100-event frames as fast as the daemon takes them, until told to stop.
ENDLESS_FLOOD_SCRIPT = r"""
import sys, msgpack, zmq
endpoint = sys.argv[1]
sock = zmq.Context().socket(zmq.PUSH)
sock.connect(endpoint)
n = 0
while True:
    event = {"topic": "flood", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}
    sock.send(msgpack.packb([{**event, "event_id": f"f{n}-{j}"} for j in range(100)]))
    n += 1
"""


@pytest.mark.timeout(120)
def test_a_fire_and_forget_flood_does_not_starve_acknowledged_batches(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    flooder = subprocess.Popen([sys.executable, "-c", ENDLESS_FLOOD_SCRIPT, daemon.ingest], cwd=ROOT)
    context: zmq.Context[Any] = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(daemon.ack)
    try:
        # The flood has filled the pull socket's queue: every read finds more of it waiting.
        eventually(lambda: daemon.stats()["received"] >= 50_000, 30, "the flood reaches the daemon")
        reply, waited = answered_after(dealer, "during")
        assert flooder.poll() is None, "the flood ended before the batch was answered"
    finally:
        flooder.kill()
        flooder.wait(10)
        dealer.close(linger=0)
        context.term()
    assert reply["new"] == 1, reply
    print(f"\nacknowledged during the flood after {waited:.2f} s")
    assert daemon.terminate() == 0, daemon.log()[-4000:]


# A publisher sending acknowledged requests the daemon refuses whole (an empty batch), as fast as it can.
REFUSED_FLOOD_SCRIPT = r"""
import sys, msgpack, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
body = msgpack.packb({"batch": 1, "events": []})
while True:
    try:
        sock.send(body, zmq.NOBLOCK)
    except zmq.Again:
        pass
    while sock.poll(0):
        sock.recv()
"""


@pytest.mark.timeout(120)
def test_a_flood_of_refused_acknowledged_requests_is_answered_in_groups(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # gather_at_queued 0: ingest never pauses, so only the writer's pace holds the refusals back.
    daemon = daemon_factory(ingest={"gather_at_queued": 0}).start()
    assert daemon.proc is not None
    flooders = [subprocess.Popen([sys.executable, "-c", REFUSED_FLOOD_SCRIPT, daemon.ack], cwd=ROOT) for _ in range(2)]
    context: zmq.Context[Any] = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(daemon.ack)
    try:
        eventually(lambda: daemon.stats()["rejected"] >= 10_000, 30, "the refused requests reach the daemon")
        with RssSampler(daemon.proc.pid) as sampler:
            time.sleep(10)
            reply, waited = answered_after(dealer, "honest")
        assert all(flooder.poll() is None for flooder in flooders), "a flood ended early"
    finally:
        for flooder in flooders:
            flooder.kill()
            flooder.wait(10)
        dealer.close(linger=0)
        context.term()
    # Each refusal once took a commit of its own: the writer fell behind, its inbox grew
    # without bound, and an honest request waited longer the longer the flood went on.
    print(f"\nanswered after {waited:.2f} s; RSS {sampler.samples[0]:.0f} -> peak {sampler.peak:.0f} MB")
    assert reply["new"] == 1, reply
    assert waited < 5, f"the honest request waited {waited:.1f} s"
    assert sampler.peak - sampler.samples[0] < 50, f"RSS {sampler.samples[0]:.0f} -> {sampler.peak:.0f} MB"
    # The floods' last requests read before the stop (on a loaded machine a queue of them could
    # still be waiting, and a stop that cannot read all it was sent within its drain exits 1).
    eventually(lambda: _rejected_settled(daemon), 30, "the floods' requests all read", detail=daemon.log)
    assert daemon.terminate() == 0, daemon.log()[-4000:]


def _rejected_settled(daemon: Daemon) -> bool:
    """Whether the daemon's count of rejected events stayed the same for a moment."""
    before = daemon.stats()["rejected"]
    time.sleep(0.5)
    return bool(daemon.stats()["rejected"] == before)
