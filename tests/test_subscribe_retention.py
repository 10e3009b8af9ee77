"""Followers and retention (docs/subscribe.md, docs/retention.md): whatever retention deleted
after a consumer's cursor is told in an ``expired`` message before what follows, never sent and
never skipped in silence. Real daemon, real sockets, real SQLite, retention really sweeping.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import Daemon
from test_retention import Acked, event, retention_daemon
from test_subscribe import RawConsumer

from transport.subscriber import Subscriber

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def stored_positions(daemon: Daemon) -> list[int]:
    conn = sqlite3.connect(daemon.db_path, timeout=10)
    try:
        return [position for (position,) in conn.execute("SELECT rowid FROM events WHERE topic <> '' ORDER BY rowid")]
    finally:
        conn.close()


def follow(consumer: RawConsumer, until: int) -> list[dict[str, Any]]:
    """Every message (events and notices) up to the one that reaches position ``until``."""
    got: list[dict[str, Any]] = []
    while True:
        message = consumer.receive()
        got.append(message)
        if message["op"] == "events" and message["events"][-1]["position"] >= until:
            return got


def subscribed(daemon: Daemon, **request: Any) -> RawConsumer:
    consumer = RawConsumer(daemon.subscribe)
    consumer.send({"op": "subscribe", **request})
    assert consumer.receive()["op"] == "subscribed"
    return consumer


def all_expired(daemon_factory: Callable[..., Daemon], count: int) -> Daemon:
    """A daemon keeping events 1 s that stored ``count`` on topic ``t``, every one deleted since."""
    daemon = retention_daemon(daemon_factory, max_age="1s")
    publisher = Acked(daemon.ack)
    try:
        publisher.send([event(n, topic="t") for n in range(count)])
    finally:
        publisher.close()
    daemon.wait_stats(timeout=60, stored=0, expired=count)
    return daemon


def test_every_hole_a_per_topic_limit_leaves_in_commit_order_is_told(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = retention_daemon(daemon_factory, max_events_per_topic=5)
    publisher = Acked(daemon.ack)
    try:
        # Three acknowledged batches, so commit order is A1-A20, B1-B2, A21-A40: the limit then
        # deletes A's oldest from the middle of commit order, around B's events.
        publisher.send([event(n, topic="A") for n in range(20)])
        publisher.send([event(n, topic="B") for n in range(2)])
        publisher.send([event(n, topic="A") for n in range(20, 40)])
        daemon.wait_stats(timeout=60, stored=7, expired=35)
    finally:
        publisher.close()
    stored = stored_positions(daemon)
    assert len(stored) == 7 and stored != list(range(stored[0], stored[0] + 7))  # a hole in the middle
    consumer = subscribed(daemon, after=0, credit=100)
    try:
        messages = follow(consumer, stored[-1])
    finally:
        consumer.close()
    cursor, sent = 0, []
    for message in messages:
        if message["op"] == "expired":
            assert message["after"] == cursor, messages
            cursor = message["first"] - 1
            continue
        for got in message["events"]:
            assert got["position"] == cursor + 1, messages  # each event follows the cursor or a notice
            cursor = got["position"]
            sent.append(cursor)
    assert sent == stored


def test_a_cursor_with_every_later_event_deleted_is_told_in_each_kind_of_subscription(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = all_expired(daemon_factory, 50)
    for request in ({"topic": "t"}, {}, {"topics": ["t", "u"]}):
        consumer = subscribed(daemon, after=10, credit=100, **request)
        try:
            assert consumer.receive() == {"op": "expired", "after": 10, "first": 51}, request
            assert consumer.quiet(0.5) == [], request
        finally:
            consumer.close()


def test_a_client_subscribing_again_and_again_behind_retention_cannot_flood_the_log(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Each subscribe told of deleted events wrote a warning: 1 000 subscribes, 1 000 lines."""
    daemon = all_expired(daemon_factory, 20)
    noisy = RawConsumer(daemon.subscribe)  # other warnings first: they must not hide these
    for _ in range(12):
        noisy.send({"op": "bogus"})
    assert noisy.receive()["code"] == "bad_request"
    noisy.close()
    for _ in range(200):
        consumer = subscribed(daemon, topic="t", after=0, credit=10)
        try:
            assert consumer.receive()["op"] == "expired"
        finally:
            consumer.close()
    warned = daemon.log().count("expired; the first still stored is")
    assert 1 <= warned <= 10, f"{warned} warnings for 200 subscribes"


def test_a_follower_is_never_sent_events_retention_deleted_from_the_recent_window(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = retention_daemon(daemon_factory, max_age="2s")
    live = subscribed(daemon, after=0, credit=1000)  # keeps the shared window of recent events filled
    publisher = Acked(daemon.ack)
    try:
        publisher.send([event(n, topic=f"t{n % 2}") for n in range(100)])
        assert len(follow(live, 100)) >= 1
        daemon.wait_stats(timeout=60, stored=0, expired=100)
        late = subscribed(daemon, after=0, credit=1000)
        try:
            assert late.receive() == {"op": "expired", "after": 0, "first": 101}
            assert late.quiet(0.5) == []
        finally:
            late.close()
        # New events after the expiry reach both followers, and only they do.
        publisher.send([event(n, topic="t0") for n in range(100, 103)])
        got = [e["position"] for m in live.quiet(1.0) if m["op"] == "events" for e in m["events"]]
        assert got == [101, 102, 103]
    finally:
        publisher.close()
        live.close()


def test_a_filtered_follower_is_told_of_a_hole_in_a_topic_it_has_been_sent(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = retention_daemon(daemon_factory, max_events_per_topic=5)
    publisher = Acked(daemon.ack)
    consumer = None
    try:
        publisher.send([event(n, topic="A") for n in range(5)])  # positions 1-5
        consumer = subscribed(daemon, topics=["A", "B"], after=0, credit=5)
        assert [e["position"] for e in follow(consumer, 5)[-1]["events"]] == [1, 2, 3, 4, 5]
        publisher.send([event(0, topic="B")])  # position 6
        publisher.send([event(n, topic="A") for n in range(5, 20)])  # positions 7-21
        daemon.wait_stats(timeout=60, stored=6, expired=15)  # A1-A15 gone; A16-A20 at 17-21 stay
        consumer.send({"op": "credit", "credit": 100})
        messages = follow(consumer, 21)
    finally:
        publisher.close()
        if consumer is not None:
            consumer.close()
    assert messages[0]["op"] == "events" and [e["position"] for e in messages[0]["events"]] == [6]
    assert messages[1] == {"op": "expired", "after": 6, "first": 17}
    assert [e["position"] for m in messages[2:] for e in m["events"]] == [17, 18, 19, 20, 21]


def test_a_filtered_follower_is_told_of_a_hole_in_a_topic_it_was_never_sent(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = retention_daemon(daemon_factory, max_events_per_topic=5)
    assert_told_of_holes_in_topics_never_sent(daemon, lambda: daemon.wait_stats(timeout=60, stored=7, expired=20))


def assert_told_of_holes_in_topics_never_sent(daemon: Daemon, deleted: Callable[[], Any]) -> None:
    """Commit order B0 (1), A0-A19 (2-21), B1 (22), A20-A24 (23-27); a limit of 5 events a topic
    deletes A0-A19 from the middle of commit order. Followers of A started at position 1 were
    never sent A: the deletion is told before A's first stored event all the same."""
    publisher = Acked(daemon.ack)
    try:
        publisher.send([event(0, topic="B")])
        publisher.send([event(n, topic="A") for n in range(20)])
        publisher.send([event(1, topic="B")])
        publisher.send([event(n, topic="A") for n in range(20, 25)])
        deleted()
    finally:
        publisher.close()
    for topics, expected in (
        (["A"], [{"op": "expired", "after": 1, "first": 23}, [23, 24, 25, 26, 27]]),
        (["A", "B"], [[22], {"op": "expired", "after": 22, "first": 23}, [23, 24, 25, 26, 27]]),
    ):
        consumer = subscribed(daemon, topics=topics, after=1, credit=100)
        try:
            got = [m if m["op"] == "expired" else [e["position"] for e in m["events"]] for m in follow(consumer, 27)]
        finally:
            consumer.close()
        assert got == expected, topics


def test_a_filtered_follower_of_a_topic_it_was_sent_gets_full_batches(daemon_factory: Callable[..., Daemon]) -> None:
    # Each event after the first batch was checked against the topic's seq before the batch, not
    # the one before it: every event looked like a hole and went in a message of its own.
    daemon = daemon_factory().start()
    publisher = Acked(daemon.ack)
    try:
        publisher.send([event(n, topic="A") for n in range(10)])
        consumer = subscribed(daemon, topics=["A", "B"], after=0, credit=5000)
        try:
            assert len(follow(consumer, 10)) == 1
            publisher.send_all([event(n, topic="A") for n in range(10, 2010)])
            messages = follow(consumer, 2010)
        finally:
            consumer.close()
    finally:
        publisher.close()
    assert sum(len(m["events"]) for m in messages) == 2000 and len(messages) <= 20, len(messages)


def test_a_cursor_past_anything_committed_is_refused(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(subscribe={"max_consumers": 1}).start()
    publisher = Acked(daemon.ack)
    try:
        publisher.send([event(n, topic="t") for n in range(10)])
    finally:
        publisher.close()
    consumer = RawConsumer(daemon.subscribe)
    other = RawConsumer(daemon.subscribe)
    try:
        consumer.send({"op": "subscribe", "after": 999, "credit": 10})
        refused = consumer.receive()
        assert refused["code"] == "bad_request" and "past the last commit position, 10" in refused["error"]
        consumer.send({"op": "subscribe", "topic": "t", "after": 11, "credit": 10})
        refused = consumer.receive()
        assert "past the last seq of topic 't', 10" in refused["error"] and "after 10 or less" in refused["error"]
        consumer.send({"op": "subscribe", "topic": "t", "after": 10, "credit": 10})
        answer = consumer.receive()
        assert answer["op"] == "subscribed" and answer["max_credit"] == 10_000
        other.send({"op": "subscribe", "after": 0, "credit": 10})
        assert other.receive()["code"] == "busy"
    finally:
        consumer.close()
        other.close()
    assert "refused a subscriber (busy)" in daemon.log()
    assert "bad subscription message: the daemon serves" not in daemon.log()


def test_a_filtered_follower_is_told_of_each_hole_once_and_of_no_empty_stretch(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Two topics interleaved, each trimmed to its last 5: a follower filtering them was told
    `expired after=0 first=11` and then `after=10 first=11` (and `after=11 first=12`), stretches
    holding nothing, as it met each topic's seqs apart over deletions before its cursor."""
    daemon = retention_daemon(daemon_factory, max_events_per_topic=5)
    publisher = Acked(daemon.ack)
    try:
        for n in range(10):
            publisher.send([event(n, topic="A"), event(n, topic="B")])
        daemon.wait_stats(timeout=60, stored=10, expired=10)
    finally:
        publisher.close()
    assert stored_positions(daemon) == list(range(11, 21))
    conn = sqlite3.connect(daemon.db_path, timeout=10)
    try:
        of_a = [position for (position,) in conn.execute("SELECT rowid FROM events WHERE topic = 'A' ORDER BY rowid")]
    finally:
        conn.close()
    for topics, positions in ((["A"], of_a), (["A", "B"], list(range(11, 21)))):
        consumer = subscribed(daemon, topics=topics, after=0, credit=100)
        try:
            messages = follow(consumer, positions[-1])
        finally:
            consumer.close()
        notices = [message for message in messages if message["op"] == "expired"]
        assert notices == [{"op": "expired", "after": 0, "first": 11}], messages
        assert [e["position"] for m in messages if m["op"] == "events" for e in m["events"]] == positions


def test_a_filtered_follower_is_told_of_a_hole_its_cursor_passed_before_another_topics_notice(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = retention_daemon(daemon_factory, max_events_per_topic=2)
    assert_told_of_a_hole_passed_before_another_notice(daemon, lambda: daemon.wait_stats(timeout=60, expired=2))


def assert_told_of_a_hole_passed_before_another_notice(daemon: Daemon, deleted: Callable[[], Any]) -> None:
    """Commit order D0 (1), B0 (2), A0 (3), B1 (4), C0-C2 (5-7), A1-A2 (8-9); a limit of 2 events a
    topic deletes A0 and C0. A follower of A, B and C from 0 passes A0's position sending B's
    events, is told of C0 before C1, and was never told of A0 before A1: the notice for C said
    that the cursor reached 5, so A0, below it, looked told."""
    publisher = Acked(daemon.ack)
    try:
        for n, topic in enumerate("DBABCCCAA"):
            publisher.send([event(n, topic=topic)])
        deleted()
    finally:
        publisher.close()
    consumer = subscribed(daemon, topics=["A", "B", "C"], after=0, credit=100)
    try:
        got = [m if m["op"] == "expired" else [e["position"] for e in m["events"]] for m in follow(consumer, 9)]
    finally:
        consumer.close()
    notices = [m for m in got if isinstance(m, dict)]
    assert notices == [{"op": "expired", "after": 4, "first": 6}, {"op": "expired", "after": 7, "first": 8}], got
    assert [position for m in got if isinstance(m, list) for position in m] == [2, 4, 6, 7, 8, 9]


def test_a_filtered_follower_told_of_a_hole_at_the_start_is_not_told_it_again(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = retention_daemon(daemon_factory, max_events_per_topic=2)
    assert_one_notice_for_a_hole_at_the_start(daemon, lambda: daemon.wait_stats(timeout=60, stored=2, expired=2))


def assert_one_notice_for_a_hole_at_the_start(daemon: Daemon, deleted: Callable[[], Any]) -> None:
    """A follower of A and B sent B0 (1); then B1-B3 (2-4) come and a limit of 2 a topic deletes
    B0 and B1. It was told `after 1, first 3` and then `after 2, first 3`, a stretch holding
    nothing, as B2's seq still looked past a hole."""
    publisher = Acked(daemon.ack)
    consumer = None
    try:
        publisher.send([event(0, topic="B")])
        consumer = subscribed(daemon, topics=["A", "B"], after=0, credit=1)
        assert [e["position"] for e in follow(consumer, 1)[-1]["events"]] == [1]
        for n in range(1, 4):
            publisher.send([event(n, topic="B")])
        deleted()
        consumer.send({"op": "credit", "credit": 100})
        got = [m if m["op"] == "expired" else [e["position"] for e in m["events"]] for m in follow(consumer, 4)]
    finally:
        publisher.close()
        if consumer is not None:
            consumer.close()
    assert got == [{"op": "expired", "after": 1, "first": 3}, [3, 4]]


def test_a_named_subscriber_told_that_the_rest_expired_acknowledges_past_it(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """A named consumer behind whose unacknowledged events retention all deleted, nothing newer
    stored: told of them, it acknowledged only the events it took, so its position stayed
    behind (its lag high) for ever and every subscription under the name was told again."""
    daemon = retention_daemon(daemon_factory, max_age="3s")
    publisher = Acked(daemon.ack)
    try:
        # Position 1 is another topic's, so the cursors differ: t's seqs 1-20 are positions 2-21.
        publisher.send([event(0, topic="other")])
        publisher.send([event(n, topic="t") for n in range(20)])
    finally:
        publisher.close()
    kinds: dict[str, dict[str, Any]] = {"one": {"topic": "t"}, "all": {}, "filtered": {"topics": ["t", "u"]}}
    for name, kind in kinds.items():  # each takes 10 events and stops, well before they expire
        with Subscriber(daemon.subscribe, name=name, **kind) as subscriber:
            for _ in range(10):
                assert subscriber.next_event(timeout=10) is not None, name
    behind = {row["name"]: row["position"] for row in daemon.request({"op": "consumers"})["consumers"]}
    assert behind == {"one": 10, "all": 10, "filtered": 11}
    daemon.wait_stats(timeout=60, stored=0, expired=21)
    # (after, first): past the topic's last seq, or past the last commit position.
    notices = {"one": (10, 21), "all": (10, 22), "filtered": (11, 22)}
    for name, kind in kinds.items():
        with Subscriber(daemon.subscribe, name=name, **kind) as subscriber:
            deadline = time.monotonic() + 10
            while not subscriber.expired and time.monotonic() < deadline:
                assert subscriber.next_event(timeout=0.2) is None, name
            assert subscriber.expired == [notices[name]], name
            assert subscriber.cursor == notices[name][1] - 1, name
    rows = {row["name"]: row for row in daemon.request({"op": "consumers"})["consumers"]}
    assert {name: (row["position"], row["lag"]) for name, row in rows.items()} == {
        "one": (20, 0),
        "all": (21, 0),
        "filtered": (21, 0),
    }
    for name, kind in kinds.items():  # told once: the next subscription under the name starts past it
        consumer = subscribed(daemon, name=name, credit=100, **kind)
        try:
            assert consumer.quiet(1.0) == [], name
        finally:
            consumer.close()
