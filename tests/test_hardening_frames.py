"""Issue 20, items 2, 5 and 9: a bomb frame costs about its own size, in-flight credit holds with the
decoder process on, and a storm of SIGHUPs neither nests reloads nor stops a clean drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import SCRIPTS, Daemon, env_with, eventually, push_frames, stored_rows

from actors.decoder import KILL_HOOK
from transport.codec import EVENT_FIELDS_BYTES, FrameError, Limits, batch_id_of, decode_ack_request, decode_frame

TIMEOUT_MS = 30_000
BOMB_EVENTS = 5_333_333
# 15 MiB: an array of 5.3 million maps {nil: []}, three bytes each (over a gigabyte as Python objects).
BOMB = b"\xdd" + BOMB_EVENTS.to_bytes(4, "big") + b"\x81\xc0\x90" * BOMB_EVENTS
DECODE_MODES = [pytest.param(True, id="decoder-process"), pytest.param(False, id="ingest-thread")]


def event(n: int, topic: str = "hf", **fields: Any) -> dict[str, Any]:
    return {
        "topic": topic,
        "event_id": f"e-{n}",
        "timestamp": f"2025-10-22T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "source": "test",
        "payload": {"n": n},
        **fields,
    }


def with_payload(payload: bytes) -> bytes:
    """One event map holding ``payload`` (already msgpack) as its payload."""
    fields = msgpack.packb({k: v for k, v in event(0).items() if k != "payload"})
    return b"\x85" + fields[1:] + b"\xa7payload" + payload


def map_bomb(count: int) -> bytes:
    """A payload map of ``count`` entries nil -> [] (two bytes each)."""
    return b"\xdf" + count.to_bytes(4, "big") + b"\xc0\x90" * count


def list_bomb(count: int) -> bytes:
    """A valid payload: {"a": a list of ``count`` empty lists} (one byte each, 64 as objects)."""
    return b"\x81\xa1a\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def peak_python_bytes(call: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- the codec, without sockets ------------------------------------------------------------------


def refused(call: Callable[[], Any]) -> str:
    with pytest.raises(FrameError) as info:
        call()
    return str(info.value)


def test_a_bomb_array_is_refused_by_its_header_before_anything_is_built() -> None:
    started = time.perf_counter()
    peak = peak_python_bytes(lambda: refused(lambda: decode_frame(BOMB)))
    assert time.perf_counter() - started < 1.0
    assert peak < 1_000_000  # nothing of the 15 MiB is copied or built
    assert refused(lambda: decode_frame(BOMB)) == f"batch of {BOMB_EVENTS} events is over the limit of 10000"


def test_a_bomb_in_an_acked_batch_is_refused_and_its_batch_id_still_read() -> None:
    frame = b"\x82\xa5batch\xa3b-1\xa6events" + BOMB
    peak = peak_python_bytes(lambda: refused(lambda: decode_ack_request(frame)))
    assert peak < 2 * len(frame)  # the top-level map's walk copies the frame once; nothing is built
    assert "over the limit of 10000" in refused(lambda: decode_ack_request(frame))
    assert batch_id_of(frame) == "b-1"
    # 'events' as a huge map, or a huge array where the batch should be: named, not built.
    as_map = b"\x82\xa5batch\x07\xa6events\xdf" + BOMB_EVENTS.to_bytes(4, "big") + b"\xc0\x90" * BOMB_EVENTS
    assert refused(lambda: decode_ack_request(as_map)) == "'events' must be an array of event maps, not map"
    assert refused(lambda: decode_ack_request(BOMB)).endswith("not array")


def test_an_event_too_large_to_be_valid_is_refused_unread_and_its_batch_kept() -> None:
    bomb = with_payload(map_bomb(4_000_000))  # 8 MB of payload: over a million objects per MB
    frame = b"\x92" + msgpack.packb(event(1)) + bomb
    batch: Any = None

    def decode() -> None:
        nonlocal batch
        batch = decode_frame(frame, Limits(max_payload_bytes=1_048_576))

    assert peak_python_bytes(decode) < 2 * len(frame)
    assert [e.event_id for e in batch.events] == ["e-1"]
    [(index, reason)] = batch.rejected
    assert index == 1 and f"over the limit of {1_048_576 + EVENT_FIELDS_BYTES}" in reason
    batch_id, acked = decode_ack_request(msgpack.packb({"batch": 3, "events": []})[:-1] + frame)
    assert batch_id == 3 and len(acked.events) == 1 and acked.rejected[0][0] == 1


def test_events_are_unpacked_one_at_a_time() -> None:
    # 8 valid events, each 100 000 empty lists (6.5 MB as objects): never all alive at once.
    one = with_payload(list_bomb(100_000))
    frame = b"\x98" + one * 8
    batch: Any = None

    def decode() -> None:
        nonlocal batch
        batch = decode_frame(frame)

    peak = peak_python_bytes(decode)
    assert len(batch.events) == 8 and not batch.rejected
    assert peak < 20_000_000, peak  # one event's objects and the stored bytes, not eight events' (52 MB)


@pytest.mark.parametrize(
    "frame",
    [b"\x92\x80\xc1", b"\x91" * 200_000, b"\x80\x80", b"\xdd\x00\x00\x00\x02\x80"],
    ids=["bad-byte", "too-deep", "trailing", "truncated"],
)
def test_malformed_frames_are_still_refused_whole(frame: bytes) -> None:
    assert refused(lambda: decode_frame(frame))
    assert refused(lambda: decode_ack_request(b"\x82\xa5batch\x01\xa6events" + frame))


# -- the daemon ----------------------------------------------------------------------------------


def decoder_pids(daemon: Daemon) -> list[int]:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [c for c in children if b"actors.decoder" in Path(f"/proc/{c}/cmdline").read_bytes()]


def high_water_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class AckedClient:
    """A DEALER on the acked endpoint: send a frame, wait for its reply."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, frame: bytes) -> dict[str, Any]:
        self.sock.send(frame)
        assert self.sock.poll(TIMEOUT_MS), "no reply"
        reply: dict[str, Any] = msgpack.unpackb(self.sock.recv())
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


@pytest.mark.e2e
@pytest.mark.parametrize("decode_process", DECODE_MODES)
def test_a_bomb_frame_costs_about_its_own_size_and_an_acked_sender_is_told(
    daemon_factory: Callable[..., Daemon], decode_process: bool
) -> None:
    daemon = daemon_factory(ingest={"decode_process": decode_process}).start()
    assert daemon.proc is not None
    push_frames(daemon.ingest, [BOMB])
    client = AckedClient(daemon.ack)
    try:
        reply = client.ask(b"\x82\xa5batch\x07\xa6events" + BOMB)
        assert reply == {"batch": 7, "error": f"batch of {BOMB_EVENTS} events is over the limit of 10000"}
        good = client.ask(msgpack.packb({"batch": 8, "events": [event(n) for n in range(10)]}))
        assert good["new"] == 10, good
    finally:
        client.close()
    daemon.wait_stats(unique_processed=10, rejected=2)
    pids = [daemon.proc.pid, *decoder_pids(daemon)]
    assert len(pids) == (2 if decode_process else 1)
    # Before: the decoder (or, without it, the daemon) peaked at 1.2-1.6 GB for each bomb.
    for pid in pids:
        assert high_water_mb(pid) < 400, (pid, high_water_mb(pid))
    assert daemon.stats()["decoder_restarts"] == 0
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_a_frame_that_kills_the_decoder_twice_is_refused_not_decoded_by_the_daemon(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory().start(env=env_with(EVENTAGG_TEST_HOOKS="1"))
    client = AckedClient(daemon.ack)
    try:
        killer = msgpack.packb({"batch": "k", "events": [event(1, payload={"x": KILL_HOOK})]})
        reply = client.ask(killer)
        assert reply["batch"] == "k"
        assert "the decoder process died twice while decoding it; send it in smaller batches" in reply["error"]
        good = client.ask(msgpack.packb({"batch": "g", "events": [event(n) for n in range(5)]}))
        assert good["new"] == 5, good
    finally:
        client.close()
    assert daemon.stats()["decoder_restarts"] == 2
    eventually(lambda: len(decoder_pids(daemon)) == 1, 20, "a decoder process runs again")
    assert daemon.terminate() == 0


@pytest.mark.e2e
@pytest.mark.parametrize("decode_process", DECODE_MODES)
def test_in_flight_stays_within_max_in_flight_plus_one_batch(
    daemon_factory: Callable[..., Daemon], decode_process: bool
) -> None:
    daemon = daemon_factory(ingest={"decode_process": decode_process}).start()
    frames = 60
    tiny = [
        msgpack.packb(
            [
                {"topic": f"t{k % 4}", "event_id": f"{k}-{i}", "timestamp": "2025-10-22T10:00:00Z", "source": ""}
                for i in range(10_000)
            ]
        )
        for k in range(frames)
    ]
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.append(daemon.stats()["in_flight"])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        push_frames(daemon.ingest, list(tiny))
        stats = daemon.wait_stats(timeout=120, unique_processed=frames * 10_000)
    finally:
        done.set()
        sampler.join(30)
    limit = 20_000 + 10_000  # max_in_flight plus one message of max_batch_events
    assert max(seen) <= limit, max(seen)
    assert 0 < stats["in_flight_peak"] <= limit, stats["in_flight_peak"]
    assert daemon.terminate() == 0


@pytest.mark.e2e
@pytest.mark.parametrize("decode_process", DECODE_MODES)
def test_a_sighup_storm_leaves_the_daemon_serving_and_a_sigterm_drains_it(
    daemon_factory: Callable[..., Daemon], decode_process: bool
) -> None:
    daemon = daemon_factory(ingest={"decode_process": decode_process}).start()
    assert daemon.proc is not None
    publisher = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "publish.py"),
            "--endpoint",
            daemon.ack,
            "--acked",
            "--events",
            "20000",
            "--batch",
            "50",
            "--rate",
            "5000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 3.0
        sent = 0
        while time.monotonic() < deadline and daemon.proc.poll() is None:  # as fast as they go
            os.kill(daemon.proc.pid, signal.SIGHUP)
            sent += 1
        assert daemon.proc.poll() is None, daemon.log()[-3000:]
        assert daemon.request({"op": "health"}).get("status") == "ok"
        out, _ = publisher.communicate(timeout=120)
        assert publisher.returncode == 0, out
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait(10)
    assert sent > 3_000
    assert daemon.terminate() == 0, daemon.log()[-3000:]
    log = daemon.log()
    assert "RecursionError" not in log
    assert "stopped: received 20000, unique 20000" in log and "drain incomplete" not in log
    assert len(stored_rows(daemon.db_path)) == 20_000
