"""A publisher written from the protocol description in docs/protocol.md with raw pyzmq + msgpack only.

Nothing of the project is imported here: the publisher side proves the wire protocol stands on
its own. (The ``daemon`` fixture starts a real daemon and is only used to check what it stored.)
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
import zmq
from harness import run_script

pytestmark = pytest.mark.e2e  # every test here starts processes

TIMEOUT_MS = 10_000


def event(n: int, topic: str = "raw", **extra: Any) -> dict[str, Any]:
    """A valid event map: topic, event_id, timestamp (ISO-8601 with a zone), source, payload."""
    return {
        "topic": topic,
        "event_id": f"raw-{n}",
        "timestamp": f"2025-10-22T10:00:{n % 60:02d}Z",
        "source": "raw-test",
        "payload": {"n": n},
        **extra,
    }


def push(endpoint: str, frames: list[bytes]) -> None:
    """Fire-and-forget: one PUSH message of one frame each; linger and terminate so none is dropped."""
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.connect(endpoint)
    for frame in frames:
        sock.send(frame)
    sock.close(linger=10_000)
    context.term()


def receive(sock: zmq.Socket[Any]) -> list[bytes]:
    assert sock.poll(TIMEOUT_MS, zmq.POLLIN), "no reply within 10 s"
    return sock.recv_multipart()


class Dealer:
    """An acknowledged-mode client over DEALER: send batches, read replies by batch id."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, batch: Any, events: Any) -> None:
        self.sock.send(msgpack.packb({"batch": batch, "events": events}))

    def reply(self) -> dict[str, Any]:
        frames = receive(self.sock)
        assert len(frames) == 1  # a DEALER sends no envelope, so none comes back
        reply: dict[str, Any] = msgpack.unpackb(frames[0])
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def test_fire_and_forget_one_event_per_frame_or_an_array(daemon: Any) -> None:
    stamped = event(3)
    stamped["timestamp"] = msgpack.Timestamp(1_761_127_200, 5_000)  # msgpack's own timestamp type
    push(
        daemon.ingest,
        [
            msgpack.packb(event(1)),
            msgpack.packb([event(2), stamped, event(4, topic="other")]),
            msgpack.packb(event(1)),  # a re-send: dropped as a duplicate
        ],
    )
    stats = daemon.wait_stats(unique_processed=4, duplicate_dropped=1)
    assert stats["received"] == 5
    stored = {e["event_id"]: e for e in daemon.events("raw")}
    assert sorted(stored) == ["raw-1", "raw-2", "raw-3"]
    assert stored["raw-3"]["timestamp"] == "2025-10-22T10:00:00.000005Z"


def test_acknowledged_batch_over_dealer_is_answered_after_commit_with_counts_and_rejections(daemon: Any) -> None:
    client = Dealer(daemon.ack)
    try:
        client.send(1, [event(1), event(2), event(1), {"topic": "raw", "event_id": "raw-bad"}, event(3)])
        reply = client.reply()
        assert reply["batch"] == 1 and reply["new"] == 3 and reply["duplicate"] == 1
        [[index, reason]] = reply["rejected"]
        assert index == 3 and "timestamp" in reason
        # The ack means committed: the events can be read back at once.
        assert sorted(e["event_id"] for e in daemon.events("raw")) == ["raw-1", "raw-2", "raw-3"]

        # Retrying the same batch (e.g. after a lost ack) is safe: it comes back as duplicates.
        client.send(1, [event(1), event(2)])
        assert client.reply() == {"batch": 1, "new": 0, "duplicate": 2, "rejected": []}

        # Several batches in flight; replies carry the id and may come in any order.
        ids = [f"b-{n}" for n in range(5)]
        for n, batch_id in enumerate(ids):
            client.send(batch_id, [event(100 + 10 * n + k) for k in range(10)])
        replies = {r["batch"]: r for r in (client.reply() for _ in ids)}
        assert set(replies) == set(ids) and all(r["new"] == 10 for r in replies.values())
    finally:
        client.close()
    daemon.wait_stats(unique_processed=53, rejected=1)


def test_a_refusal_is_counted_in_rejected_by_the_time_it_is_answered(daemon: Any) -> None:
    assert_refusals_counted_when_answered(daemon)


def assert_refusals_counted_when_answered(daemon: Any) -> None:
    """Each answer that carries a refusal (an event refused in a stored batch, every event
    refused, a frame refused whole) is counted in ``rejected`` by stats read right after it."""
    client = Dealer(daemon.ack)
    try:
        expected = daemon.stats()["rejected"]
        for n in range(5):
            client.send(f"some-{n}", [event(1000 + n), {"topic": "raw", "event_id": "no-timestamp"}])
            assert client.reply()["new"] == 1
            expected += 1
            assert daemon.stats()["rejected"] == expected
            client.send(f"none-{n}", [{"topic": "raw", "event_id": "a"}, {"topic": "raw", "event_id": "b"}])
            assert len(client.reply()["rejected"]) == 2
            expected += 2
            assert daemon.stats()["rejected"] == expected
            client.sock.send(msgpack.packb({"batch": f"whole-{n}", "events": "not an array"}))
            assert "error" in client.reply()
            expected += 1
            assert daemon.stats()["rejected"] == expected
    finally:
        client.close()


def test_timestamps_beyond_64_bit_nanoseconds_are_refused_and_the_daemon_keeps_serving(daemon: Any) -> None:
    # ts_ns is an SQLite INTEGER: an instant it cannot hold once stopped the writer for good.
    far = [
        event(1, topic="far", timestamp="9999-12-31T23:59:59Z"),
        event(2, topic="far", timestamp="1000-01-01T00:00:00Z"),
        event(3, topic="far", timestamp=msgpack.Timestamp(2**40, 0)),
        event(4, topic="far", timestamp="2262-04-11T23:47:16.854775Z"),
    ]  # the last instant that fits
    client = Dealer(daemon.ack)
    try:
        client.send(1, far)
        reply = client.reply()
        assert reply["new"] == 1, reply
        assert [index for index, _ in reply["rejected"]] == [0, 1, 2]
        assert all("out of range" in reason and "2262-04-11" in reason for _, reason in reply["rejected"])
        push(daemon.ingest, [msgpack.packb(far[:2] + [event(5, topic="far")])])
        daemon.wait_stats(unique_processed=2, rejected=5)
        client.send(2, [event(6, topic="far")])  # still serving
        assert client.reply()["new"] == 1
    finally:
        client.close()
    assert sorted(e["event_id"] for e in daemon.events("far")) == ["raw-4", "raw-5", "raw-6"]


def test_acknowledged_batch_over_req_keeps_the_envelope(daemon: Any) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.ack)
    try:
        sock.send(msgpack.packb({"batch": "req-1", "events": [event(7)]}))
        [frame] = receive(sock)  # REQ strips the empty delimiter the daemon echoed back
        assert msgpack.unpackb(frame) == {"batch": "req-1", "new": 1, "duplicate": 0, "rejected": []}
    finally:
        sock.close(linger=0)
        context.term()


def test_a_malformed_acknowledged_request_gets_an_error_reply_at_once(daemon: Any) -> None:
    client = Dealer(daemon.ack)
    try:
        client.send(7, "not an array")
        reply = client.reply()
        assert reply["batch"] == 7 and "events" in reply["error"]

        client.sock.send(b"\xc1 not msgpack")
        reply = client.reply()
        assert reply["batch"] is None and "msgpack" in reply["error"]

        client.send(True, [event(1)])  # a boolean is not a valid batch id
        assert "batch" in client.reply()["error"]

        started = time.monotonic()
        client.send(8, [])  # an empty batch is refused whole
        assert "empty" in client.reply()["error"]
        assert time.monotonic() - started < 5
    finally:
        client.close()
    assert daemon.stats()["unique_processed"] == 0


def test_an_envelope_over_the_limit_is_refused_with_a_reason_and_one_within_it_comes_back(daemon: Any) -> None:
    client = Dealer(daemon.ack)
    try:
        body = msgpack.packb({"batch": "big", "events": [event(1)]})
        client.sock.send_multipart([b"E" * 8 * 1024 * 1024, body])  # every reply would echo 8 MiB
        reply = client.reply()
        assert reply["batch"] == "big" and "envelope" in reply["error"] and "4096 bytes" in reply["error"], reply
        client.sock.send_multipart([b"hop"] * 17 + [body])
        assert "17 frames" in client.reply()["error"]
        client.sock.send_multipart([b"hop"] * 16 + [msgpack.packb({"batch": "ok", "events": [event(2)]})])
        frames = receive(client.sock)
        assert frames[:-1] == [b"hop"] * 16
        assert msgpack.unpackb(frames[-1]) == {"batch": "ok", "new": 1, "duplicate": 0, "rejected": []}
    finally:
        client.close()
    stats = daemon.stats()
    assert stats["rejected"] == 2 and stats["unique_processed"] == 1, stats


def test_a_msgpack_timestamp_is_stored_to_the_nanosecond_so_a_resend_differing_below_it_conflicts(daemon: Any) -> None:
    client = Dealer(daemon.ack)
    try:
        client.send(1, [event(1, timestamp=msgpack.Timestamp(1_761_127_200, 5))])
        assert client.reply()["new"] == 1
        client.send(2, [event(1, timestamp=msgpack.Timestamp(1_761_127_200, 5))])  # the same instant
        assert client.reply() == {"batch": 2, "new": 0, "duplicate": 1, "rejected": []}
        client.send(3, [event(1, timestamp=msgpack.Timestamp(1_761_127_200, 6))])  # a nanosecond later
        reply = client.reply()
        assert reply["duplicate"] == 1 and reply["conflicting"] == [0], reply
    finally:
        client.close()
    [stored] = daemon.events("raw")
    assert stored["timestamp"] == "2025-10-22T10:00:00.000000005Z"


def test_error_replies_name_the_batch_when_its_id_comes_before_what_is_wrong(daemon: Any) -> None:
    good = msgpack.packb({k: v for k, v in event(1).items() if k != "payload"})
    deep = msgpack.packb("payload") + b"\x81\xa1d" + b"\x91" * 1100 + b"\xc0"
    bad_byte = msgpack.packb("payload") + b"\x81\xa1d\xc1"
    head = b"\x82" + msgpack.packb("batch")

    def request(batch_id: str, body: bytes) -> bytes:
        event_map = b"\x85" + good[1:] + body  # the event's four fields and a hand-made payload
        return head + msgpack.packb(batch_id) + msgpack.packb("events") + b"\x91" + event_map

    client = Dealer(daemon.ack)
    try:
        client.sock.send(request("deep", deep))
        reply = client.reply()
        assert reply["batch"] == "deep" and "1024 levels deep" in reply["error"], reply
        client.sock.send(request("c1", bad_byte))
        reply = client.reply()
        assert reply["batch"] == "c1" and "0xc1" in reply["error"], reply
        client.sock.send(msgpack.packb({"batch": "trailing", "events": [event(2)]}) + b"\x00")
        reply = client.reply()
        assert reply["batch"] == "trailing" and "more than one msgpack object" in reply["error"], reply
        client.send("x" * 5000, [event(3)])
        assert "over the limit of 4096" in client.reply()["error"]
        # An event holding a msgpack-reserved ext type is refused alone; the rest of its batch is stored.
        reserved = msgpack.packb(event(4)).replace(msgpack.packb({"n": 4}), b"\x81\xa1k\xd4\x80\x00")
        client.sock.send(
            head + msgpack.packb("ext") + msgpack.packb("events") + b"\x92" + reserved + msgpack.packb(event(5))
        )
        reply = client.reply()
        assert reply["new"] == 1 and reply["rejected"][0][0] == 0 and "type -128" in reply["rejected"][0][1], reply
    finally:
        client.close()
    assert [e["event_id"] for e in daemon.events("raw")] == ["raw-5"]


def deep_event(event_id: str, depth: int) -> bytes:
    """An event map, encoded, whose payload nests ``depth`` levels (its own map counting as one)."""
    head = msgpack.packb({"topic": "deep", "event_id": event_id, "timestamp": "2025-10-22T10:00:00Z", "source": "s"})
    payload = b"\x81\xa1a" + b"\x91" * (depth - 2) + b"\x90"
    return b"\x85" + head[1:] + msgpack.packb("payload") + payload


def test_a_payload_too_deep_to_read_back_is_refused_alone_and_the_deepest_taken_reads_back(daemon: Any) -> None:
    # A query or subscription carries each event three levels down, and msgpack reads 1024: a
    # payload 1022 deep was stored, and then every reader of its topic (or of all) failed on it.
    frame = msgpack.packb("batch") + msgpack.packb(1) + msgpack.packb("events")
    frame = b"\x82" + frame + b"\x93" + deep_event("1021", 1021) + deep_event("1022", 1022) + msgpack.packb(event(1))
    client = Dealer(daemon.ack)
    try:
        client.sock.send(frame)
        reply = client.reply()
    finally:
        client.close()
    assert reply["new"] == 2, reply
    [[index, reason]] = reply["rejected"]
    assert index == 1 and "more than 1021 levels deep" in reason
    push(daemon.ingest, [deep_event("push-1021", 1021), deep_event("push-1022", 1022)])
    daemon.wait_stats(unique_processed=3, rejected=2)
    assert sorted(e["event_id"] for e in daemon.events("deep")) == ["1021", "push-1021"]
    assert len(daemon.events()) == 3  # all topics, through the same deep events
    result = run_script("events.py", "--endpoint", daemon.query, "deep")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2, result.stderr


def test_a_query_sent_to_the_acknowledged_endpoint_is_told_where_queries_go(daemon: Any) -> None:
    """It was answered "an acknowledged batch needs a 'batch' id", which `eventagg health` printed
    as the daemon's own problem."""
    said = run_script("stats.py", "--endpoint", daemon.ack, "--timeout", "10", timeout=30)
    assert said.returncode == 1, said.stderr
    assert "acknowledged ingest endpoint ([ingest] ack_bind)" in said.stderr and "[query] bind" in said.stderr, said
    # A batch without its id is still told what it lacks.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.connect(daemon.ack)
        sock.send(msgpack.packb({"events": [event(1)]}))
        assert sock.poll(10_000), "no answer"
        assert "needs a 'batch' id" in msgpack.unpackb(sock.recv())["error"]
    finally:
        sock.close(linger=0)


def test_a_refusal_quotes_a_huge_op_or_field_name_cut_short_in_its_reply_and_the_log(daemon: Any) -> None:
    """Unknown ops and field names were quoted whole: a 500 KB op name came back in a 500 KB
    error reply and went into a 500 KB log line, from the query and the subscribe endpoints alike
    (thousands of unknown fields the same), where other refusals quote 40 to 80 characters."""
    huge = "x" * 500_000
    many = {f"field-{n}": n for n in range(5000)}
    context = zmq.Context.instance()
    query = context.socket(zmq.DEALER)  # a DEALER with REQ's empty frame: one socket for every request
    follower = context.socket(zmq.DEALER)
    try:
        query.connect(daemon.query)
        follower.connect(daemon.subscribe)
        asked: list[tuple[zmq.Socket[Any], dict[Any, Any], str]] = [
            (query, {"op": huge}, "unknown op 'xxxx"),
            (query, {"op": "events", huge: 1}, "unknown field(s) xxxx"),
            (query, {"op": "stats", **many}, "unknown field(s) field-0"),
            (follower, {"op": huge}, "unknown op 'xxxx"),
            (follower, {"op": "subscribe", huge: 1}, "unknown field(s) xxxx"),
            (follower, {"op": "subscribe", **many}, "unknown field(s) field-0"),
        ]
        for sock, request, said in asked:
            frames = [b"", msgpack.packb(request)] if sock is query else [msgpack.packb(request)]
            sock.send_multipart(frames)
            reply = receive(sock)[-1]
            assert len(reply) < 1000, (said, len(reply))
            assert said in msgpack.unpackb(reply)["error"], reply
        follower.send(msgpack.packb({"op": None}))
        assert "unknown op nil;" in msgpack.unpackb(receive(follower)[0])["error"]  # msgpack's word, not Python's
    finally:
        query.close(linger=0)
        follower.close(linger=0)
    assert max(len(line) for line in daemon.log().splitlines()) < 2000
