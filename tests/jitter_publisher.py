"""A publisher process for ordering tests: sends one topic's events with random delays (raw pyzmq).

``jitter_publisher.py ENDPOINT TOPIC INDEX COUNT EVENTS MAX_JITTER_MS SEED``: sends events
i = INDEX, INDEX+COUNT, ... below EVENTS, each stamped BASE + i ms, each after a random pause
of up to MAX_JITTER_MS, so events from several such processes arrive out of timestamp order.
"""

from __future__ import annotations

import datetime as dt
import random
import sys
import time

import msgpack
import zmq

BASE = dt.datetime(2025, 10, 22, 10, 0, 0, tzinfo=dt.UTC)


def main() -> None:
    endpoint, topic = sys.argv[1], sys.argv[2]
    index, count, events, jitter_ms, seed = (int(a) for a in sys.argv[3:8])
    rng = random.Random(seed)
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.connect(endpoint)
    for i in range(index, events, count):
        time.sleep(rng.uniform(0, jitter_ms) / 1000)
        stamp = (BASE + dt.timedelta(milliseconds=i)).isoformat().replace("+00:00", "Z")
        sock.send(
            msgpack.packb(
                {
                    "topic": topic,
                    "event_id": f"{topic}-{i}",
                    "timestamp": stamp,
                    "source": f"host-{index}",
                    "payload": {"i": i},
                }
            )
        )
    sock.close(linger=10_000)
    context.term()


if __name__ == "__main__":
    main()
