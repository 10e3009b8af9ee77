#!/usr/bin/env python3
"""Measure what hostile frames cost the daemon: ``frame_cost.py [--kind K] [--frames N] [--no-decode-process]``.

Starts a daemon on a fresh database, sends ``--frames`` hostile frames of ``--kind``, then one
honest acknowledged batch, and prints as JSON: the peak resident memory (VmHWM) of the daemon
and of its decoder process, how long until every hostile frame was counted as rejected, and how
long the honest batch waited for its acknowledgement. Kinds (each about 15 MiB):

* ``array``: an array of 5.3 million maps ``{nil: []}`` (issue 20's bomb), fire-and-forget;
* ``acked``: the same array as an acknowledged batch's ``events``;
* ``payload``: one event whose payload is 7.5 million entries ``nil: []``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

HERE = Path(__file__).resolve().parent
BOMB_EVENTS = 5_333_333
TIMEOUT_S = 120.0


def hostile(kind: str, n: int) -> bytes:
    bomb = b"\xdd" + BOMB_EVENTS.to_bytes(4, "big") + b"\x81\xc0\x90" * BOMB_EVENTS
    if kind == "array":
        return bomb
    if kind == "acked":
        return bytes(b"\x82" + msgpack.packb("batch") + msgpack.packb(f"bomb-{n}") + msgpack.packb("events") + bomb)
    fields = msgpack.packb({"topic": "t", "event_id": f"p{n}", "timestamp": "2025-10-22T10:00:00Z", "source": ""})
    entries = 7_500_000
    return bytes(b"\x85" + fields[1:] + b"\xa7payload\xdf" + entries.to_bytes(4, "big") + b"\xc0\x90" * entries)


def high_water_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def decoder_pids(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if b"actors.decoder" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except OSError:
                pass
    return found


def stats(context: zmq.Context[Any], endpoint: str) -> dict[str, Any] | None:
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(msgpack.packb({"op": "stats"}))
        if not sock.poll(1_000):
            return None
        reply: dict[str, Any] = msgpack.unpackb(sock.recv())
        return reply
    finally:
        sock.close(linger=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the daemon's peak memory and delay for hostile frames.")
    parser.add_argument("--kind", choices=["array", "acked", "payload"], default="array")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--no-decode-process", dest="decode_process", action="store_false")
    parser.add_argument("--port", type=int, default=25_656)
    args = parser.parse_args(argv)
    ingest, ack, query = (f"tcp://127.0.0.1:{args.port + k}" for k in range(3))
    context: zmq.Context[Any] = zmq.Context()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "config.toml").write_text(
            f'[ingest]\nbind = "{ingest}"\nack_bind = "{ack}"\n'
            f"decode_process = {'true' if args.decode_process else 'false'}\n"
            f'[query]\nbind = "{query}"\n[subscribe]\nbind = "tcp://127.0.0.1:{args.port + 3}"\n'
            '[storage]\npath = "events.db"\n'
        )
        daemon = subprocess.Popen(
            [sys.executable, str(HERE / "aggregatord.py"), "--config", str(work / "config.toml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        push = context.socket(zmq.PUSH)
        dealer = context.socket(zmq.DEALER)
        try:
            deadline = time.monotonic() + 60
            while stats(context, query) is None:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("frame_cost: the daemon did not start")
            decoders = set(decoder_pids(daemon.pid))
            figures: dict[str, Any] = {
                "kind": args.kind,
                "frames": args.frames,
                "decode_process": args.decode_process,
                "daemon_idle_mb": round(high_water_mb(daemon.pid)),
                "decoder_idle_mb": round(max([high_water_mb(p) for p in decoders], default=0)),
            }
            frames = [hostile(args.kind, n) for n in range(args.frames)]
            figures["frame_bytes"] = len(frames[0])
            push.connect(ingest)
            dealer.connect(ack)
            started = time.monotonic()
            for frame in frames:
                (dealer if args.kind == "acked" else push).send(frame)
            dealer.send(msgpack.packb({"batch": "honest", "events": [
                {"topic": "t", "event_id": "honest", "timestamp": "2025-10-22T10:00:00Z", "source": ""}
            ]}))  # fmt: skip
            peaks = {"daemon": 0.0, "decoder": 0.0}
            honest_s = rejected_s = None
            while honest_s is None or rejected_s is None:
                if time.monotonic() - started > TIMEOUT_S or daemon.poll() is not None:
                    figures["failed"] = (
                        f"daemon exit status {daemon.poll()}" if daemon.poll() is not None else "timeout"
                    )
                    break
                decoders.update(decoder_pids(daemon.pid))
                peaks["daemon"] = max(peaks["daemon"], high_water_mb(daemon.pid))
                peaks["decoder"] = max([peaks["decoder"], *(high_water_mb(p) for p in decoders)])
                while dealer.poll(0):
                    if msgpack.unpackb(dealer.recv()).get("batch") == "honest":
                        honest_s = time.monotonic() - started
                current = stats(context, query) if rejected_s is None else None
                if current is not None and current["rejected"] >= args.frames:
                    rejected_s = time.monotonic() - started
                time.sleep(0.02)
            figures.update(
                daemon_peak_mb=round(peaks["daemon"]),
                decoder_peak_mb=round(peaks["decoder"]),
                all_rejected_s=None if rejected_s is None else round(rejected_s, 2),
                honest_acked_s=None if honest_s is None else round(honest_s, 2),
                decoder_processes=len(decoders),
            )
            print(json.dumps(figures))
        finally:
            push.close(linger=0)
            dealer.close(linger=0)
            context.term()
            if daemon.poll() is None:
                daemon.terminate()
                daemon.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
