"""The decoder process: what it decodes is what the ingest thread would, and losing it loses nothing."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, eventually, push_frames

from actors.decoder import (
    ACKNOWLEDGED,
    FIRE_AND_FORGET,
    OK,
    REFUSED,
    Decoded,
    DecoderProcess,
    DecoderUnavailable,
    _decode,
    _encode,
    decode_message,
)
from transport.codec import Limits

TIMEOUT_MS = 20_000


def event(n: int, topic: str = "dec", **fields: Any) -> dict[str, Any]:
    return {
        "topic": topic,
        "event_id": f"e-{n}",
        "timestamp": f"2025-10-22T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "source": "test",
        "payload": {"n": n},
        **fields,
    }


def decoder_pids(daemon: Daemon) -> list[int]:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    # Listed under the thread that started each: the main thread, or ingest after a restart.
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [c for c in children if b"actors.decoder" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (FIRE_AND_FORGET, msgpack.packb([event(1), {"topic": "dec"}, event(2, timestamp="9999-01-01T00:00:00Z")])),
        (FIRE_AND_FORGET, b"\xc1"),
        (ACKNOWLEDGED, msgpack.packb({"batch": "b-1", "events": [event(3), "not a map"]})),
        (ACKNOWLEDGED, msgpack.packb({"batch": 7, "events": "nope"})),
    ],
)
def test_a_result_reads_back_exactly_as_it_was_decoded(kind: bytes, body: bytes) -> None:
    decoded = decode_message(kind, body, Limits())
    assert _decode(_encode(decoded)) == decoded
    assert decoded.status in (OK, REFUSED)


def test_refusals_name_the_batch_and_the_reason() -> None:
    refused = decode_message(ACKNOWLEDGED, msgpack.packb({"batch": 7, "events": "nope"}), Limits())
    assert refused == Decoded(REFUSED, 7, "'events' must be an array of event maps, not str", [], [])
    mixed = decode_message(FIRE_AND_FORGET, msgpack.packb([event(1), {"topic": "dec"}]), Limits())
    assert [e.event_id for e in mixed.events] == ["e-1"]
    assert mixed.rejected[0][0] == 1 and "missing field" in mixed.rejected[0][1]


def acked_run(daemon: Daemon, batches: int, size: int, during: Callable[[int], None]) -> dict[Any, dict[str, Any]]:
    """Send ``batches`` acknowledged batches (calling ``during(k)`` after the k-th) and collect every reply."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.ack)
    replies: dict[Any, dict[str, Any]] = {}
    try:
        for k in range(batches):
            sock.send(msgpack.packb({"batch": k, "events": [event(k * size + i) for i in range(size)]}))
            during(k)
        while len(replies) < batches:
            assert sock.poll(TIMEOUT_MS), f"{batches - len(replies)} batches never acknowledged"
            reply = msgpack.unpackb(sock.recv())
            replies[reply["batch"]] = reply
    finally:
        sock.close(linger=0)
        context.term()
    return replies


@pytest.mark.e2e
def test_the_decoder_runs_beside_the_daemon_and_ends_with_it(daemon: Daemon) -> None:
    [pid] = decoder_pids(daemon)
    assert daemon.request({"op": "health"})["decoding"] == f"decoder process, pid {pid}"
    push_frames(daemon.ingest, [msgpack.packb([event(n) for n in range(k, k + 50)]) for k in range(0, 500, 50)])
    daemon.wait_stats(unique_processed=500)
    assert daemon.terminate() == 0
    eventually(
        lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
        10,
        "the decoder process ends with the daemon",
    )


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_daemons_whole_process_group_leaves_the_decoder_to_the_daemon(
    daemon_factory: Callable[..., Daemon], signum: signal.Signals
) -> None:
    # As Ctrl-C in a terminal, timeout(1) or `kill -TERM -- -PGID` do. The decoder must not die
    # (or be replaced) under a draining daemon, nor end on SIGHUP, which only re-reads the log level.
    daemon = daemon_factory().start(own_session=True)
    assert daemon.proc is not None
    [pid] = decoder_pids(daemon)
    push_frames(daemon.ingest, [msgpack.packb([event(n) for n in range(k, k + 50)]) for k in range(0, 500, 50)])
    daemon.wait_stats(unique_processed=500)
    os.killpg(daemon.proc.pid, signum)
    if signum == signal.SIGHUP:
        eventually(lambda: "SIGHUP: re-read" in daemon.log(), 20, "the daemon handles SIGHUP")
        assert decoder_pids(daemon) == [pid]
        assert daemon.terminate() == 0
    else:
        assert daemon.proc.wait(60) == 0
    log = daemon.log()
    assert "decoder process died" not in log and "stopped: received 500, unique 500" in log


@pytest.mark.e2e
def test_a_killed_decoder_loses_nothing_and_is_replaced(daemon: Daemon) -> None:
    [first] = decoder_pids(daemon)

    def kill_midway(k: int) -> None:
        if k == 40:
            os.kill(first, signal.SIGKILL)

    replies = acked_run(daemon, batches=120, size=50, during=kill_midway)
    assert sum(r["new"] for r in replies.values()) == 6_000
    assert all(r["duplicate"] == 0 and r["rejected"] == [] for r in replies.values())
    daemon.wait_stats(unique_processed=6_000, duplicate_dropped=0)
    [second] = eventually(lambda: decoder_pids(daemon), 20, "a new decoder process\n" + daemon.log())
    assert second != first
    assert "the decoder process died" in daemon.log()
    eventually(
        lambda: daemon.request({"op": "health"})["decoding"] == f"decoder process, pid {second}",
        20,
        "health names the new decoder",
    )
    assert daemon.stats()["decoder_restarts"] == 1
    # The new one decodes: a re-send of everything is all duplicates.
    replies = acked_run(daemon, batches=120, size=50, during=lambda k: None)
    assert sum(r["duplicate"] for r in replies.values()) == 6_000
    assert decoder_pids(daemon) == [second], daemon.log()


@pytest.mark.e2e
def test_a_stuck_decoder_is_replaced_and_its_messages_decoded_here(daemon: Daemon) -> None:
    [first] = decoder_pids(daemon)
    os.kill(first, signal.SIGSTOP)
    try:
        push_frames(daemon.ingest, [msgpack.packb([event(n) for n in range(k, k + 10)]) for k in range(0, 100, 10)])
        daemon.wait_stats(timeout=30, unique_processed=100)
        assert "the decoder process stopped answering" in daemon.log()
    finally:
        try:
            os.kill(first, signal.SIGCONT)  # if it was not killed after all, let cleanup end it
        except ProcessLookupError:
            pass


@pytest.mark.e2e
def test_without_the_decoder_process_frames_are_decoded_on_the_ingest_thread(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(ingest={"decode_process": False}).start()
    assert decoder_pids(daemon) == []
    assert daemon.request({"op": "health"})["decoding"] == "ingest thread"
    push_frames(daemon.ingest, [msgpack.packb([event(1), event(2), {"topic": "dec"}]), b"\xc1"])
    stats = daemon.wait_stats(unique_processed=2, rejected=2)
    assert stats["received"] == 2


@pytest.mark.e2e
def test_without_room_for_its_sockets_the_daemon_decodes_on_the_ingest_thread(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    # An ipc socket's path must fit in ~107 bytes; a $TMPDIR this long leaves no room for one.
    long_tmp = tmp_path / ("t" * 120)
    long_tmp.mkdir()
    daemon = daemon_factory().start(env={**os.environ, "TMPDIR": str(long_tmp)})
    assert decoder_pids(daemon) == []
    assert daemon.request({"op": "health"})["decoding"] == "ingest thread"
    assert "frames are decoded on the ingest thread" in daemon.log()
    push_frames(daemon.ingest, [msgpack.packb([event(1), event(2)])])
    daemon.wait_stats(unique_processed=2)


@pytest.mark.e2e
def test_a_decoder_that_exits_as_it_starts_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.executable", "/bin/false")  # a child that exits with status 1 at once
    context = zmq.Context()
    decoder = DecoderProcess(context, Limits())
    started = time.monotonic()
    try:
        with pytest.raises(DecoderUnavailable, match="exited with status 1"):
            decoder.start()
        assert time.monotonic() - started < 5  # not the 15 s it waits for a live but silent one
    finally:
        decoder.stop()
        context.term()


@pytest.mark.e2e
def test_a_killed_daemon_leaves_no_decoder_and_no_socket_directory(daemon: Daemon) -> None:
    [pid] = decoder_pids(daemon)
    endpoint = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3].decode()
    folder = Path(endpoint.removeprefix("ipc://")).parent
    assert folder.name.startswith("eventagg-decoder-") and folder.is_dir()
    daemon.kill()  # SIGKILL: the daemon cannot clean up; the decoder notices it is orphaned
    eventually(
        lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
        10,
        "the decoder process ends",
    )
    eventually(lambda: not folder.exists(), 10, f"{folder} removed")


@pytest.mark.e2e
def test_a_decoder_that_dies_while_idle_is_replaced_before_the_next_frame(daemon: Daemon) -> None:
    [first] = decoder_pids(daemon)
    os.kill(first, signal.SIGKILL)
    [second] = eventually(lambda: [p for p in decoder_pids(daemon) if p != first], 20, "a new decoder process")
    # Health says so once the new one is connected and ready, a moment after it appears.
    eventually(
        lambda: daemon.request({"op": "health"})["decoding"] == f"decoder process, pid {second}",
        20,
        "health names the new decoder",
    )
    assert daemon.stats()["decoder_restarts"] == 1
