#!/usr/bin/env python3
"""What the ingest thread pays to read the decoder process's answers: ``Event`` tuples against columns.

The decoder process sends each message's events back as msgpack (``actors.decoder.Decoded``) and
the ingest thread decodes them, in C, into one ``Event`` tuple each. This times that against
decoding the same events sent as six columns (one list per field), which is what passing
columns from the decoder on would cost instead. Medians of ``--runs`` alternating runs, in
nanoseconds per event. With ``--decoder``, the decoder process's own work instead: each of
``bench.py``'s frames (``transport.workload.plan``, 20 % re-sends, 10 topics) through
``decode_message`` and the encoding of its answer, in process CPU time.

    python3 scripts/decode_cost.py
    python3 scripts/decode_cost.py --decoder
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit

import msgpack
import msgspec

from actors.decoder import FIRE_AND_FORGET, OK, Decoded, _decode, _encode, decode_message
from transport.codec import Limits
from transport.schema import Event
from transport.workload import plan

Columns = tuple[list[str], list[str], list[str], list[int], list[str], list[bytes]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100, help="events per message (default 100)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each, alternating (default 5)")
    parser.add_argument(
        "--decoder", action="store_true", help="time the decoder process's work on bench.py's frames instead"
    )
    args = parser.parse_args(argv)
    if args.decoder:
        return _decoder_cost(args.events, args.runs)

    payload = msgspec.msgpack.encode({"n": 3, "level": "info", "message": "event 3"})
    events = [
        Event(f"topic-{i % 10}", f"e{i}", "2025-10-22T10:00:00.003Z", 1_761_127_200_003_000_000 + i, "bench", payload)
        for i in range(args.events)
    ]
    as_tuples = _encode(Decoded(OK, None, "", events, []))
    as_columns = msgspec.msgpack.encode([[event[field] for event in events] for field in range(6)])
    decode_columns = msgspec.msgpack.Decoder(Columns).decode
    assert [Event(*row) for row in zip(*decode_columns(as_columns))] == _decode(as_tuples).events

    loops = max(1, 2_000_000 // args.events)
    results: dict[str, list[float]] = {"Event tuples": [], "columns": []}
    for _ in range(args.runs):
        for name, work in (
            ("Event tuples", lambda: _decode(as_tuples)),
            ("columns", lambda: decode_columns(as_columns)),
        ):
            results[name].append(timeit.timeit(work, number=loops) / loops / args.events * 1e9)
    for name, values in results.items():
        runs = " ".join(f"{value:.0f}" for value in values)
        print(f"{name:12} median {statistics.median(values):.0f} ns an event  (runs: {runs})")
    return 0


def _decoder_cost(batch: int, runs: int, count: int = 100_000) -> int:
    """Process CPU time an event for ``count`` events in frames of ``batch``, ``runs`` times."""
    events = plan(count, 0.2, 10)
    frames = [msgpack.packb(events[i : i + batch]) for i in range(0, count, batch)]
    limits = Limits()
    decoded = [decode_message(FIRE_AND_FORGET, frame, limits) for frame in frames]  # warm, and checked
    assert all(answer.status == OK and not answer.rejected for answer in decoded)
    values = []
    for _ in range(runs):
        began = time.process_time()
        for frame in frames:
            _encode(decode_message(FIRE_AND_FORGET, frame, limits))
        values.append((time.process_time() - began) / count * 1e9)
    runs_text = " ".join(f"{value:.0f}" for value in values)
    print(f"decoder      median {statistics.median(values):.0f} ns an event  (runs: {runs_text})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
