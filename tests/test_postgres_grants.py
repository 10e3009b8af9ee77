"""A daemon whose PostgreSQL role lacks a privilege says which, on which table, and the GRANT.

At start it refuses with one line listing every missing privilege; a privilege revoked while it
runs is named wherever it is met (writes, retention's sweep, queries, named consumers), and the
daemon keeps what it holds until the GRANT, then goes on, losing nothing. Runs against a real
throwaway PostgreSQL cluster (tests/pg_cluster.py); the daemons connect as roles of the test's own.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import ROOT, Daemon, eventually, write_config
from pg_cluster import made_at_version, missing_reason
from test_postgres import _startup_failure, pg_daemon, query, serves_a_publisher_and_a_named_consumer
from test_subscribe import RawConsumer

from actors.pg_grants import RUNNING_NEEDS
from transport.publisher import Publisher
from transport.workload import plan

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or ""),
]

# What docs/postgresql.md tells an operator to grant a role that does not own the tables.
DOCUMENTED_GRANTS = (
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
    "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
)


def runtime_role(database: str, role: str, *statements: str) -> str:
    """A login role that owns nothing here (PUBLIC may not create in the schema); the dsn that
    connects as it. ``statements`` (``{role}`` filled in) then run as the owner."""
    query(database, f"CREATE ROLE {role} LOGIN")
    query(database, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    for statement in statements:
        query(database, statement.format(role=role))
    return database.replace("postgresql://postgres@", f"postgresql://{role}@")


def made_by_owner(daemon_factory: Callable[..., Daemon], database: str) -> None:
    """The schema, made by a daemon connected as the database's owner."""
    owner = pg_daemon(daemon_factory, "owner", database).start()
    assert owner.terminate() == 0


def grants_in(message: str) -> list[str]:
    """The GRANT statements a message tells the operator to run."""
    return re.findall(r"GRANT [A-Z, ]+ ON [A-Z]+ \S+ TO \w+", message)


def run_migrate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actors.cli", "migrate", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.timeout(120)
def test_a_start_lacking_privileges_is_refused_with_one_line_naming_each_and_its_grant(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """Before, this daemon started and each missing privilege surfaced later, one at a time, as
    PostgreSQL's "permission denied for table events" (no role, no privilege, no GRANT): its
    writes were retried for ever, its sweeps and named consumers refused."""
    made_by_owner(daemon_factory, database)
    dsn = runtime_role(
        database,
        "short",
        *DOCUMENTED_GRANTS[:2],  # the tables' privileges, not the sequence's
        "REVOKE INSERT ON events FROM {role}",
        "REVOKE DELETE, UPDATE ON deleted_keys FROM {role}",
    )
    line = _startup_failure(pg_daemon(daemon_factory, "short", dsn), status=2)  # no restart loop under systemd
    assert "PostgreSQL role short lacks privileges eventagg uses on PostgreSQL 127.0.0.1:" in line, line
    for lacking in (
        "INSERT on table public.events",
        "UPDATE, DELETE on table public.deleted_keys",
        "USAGE on sequence public.consumer_claim_numbers",
    ):
        assert lacking in line, line
    grants = grants_in(line)
    assert grants == [
        "GRANT INSERT ON TABLE public.events TO short",
        "GRANT UPDATE, DELETE ON TABLE public.deleted_keys TO short",
        "GRANT USAGE ON SEQUENCE public.consumer_claim_numbers TO short",
    ], line
    assert 'docs/postgresql.md, "Privileges"' in line

    # A schema the role may not use hides the tables: it is named too, rather than the daemon
    # trying to create them (which said only "no schema has been selected to create in").
    query(database, "REVOKE USAGE ON SCHEMA public FROM PUBLIC")
    query(database, "REVOKE USAGE ON SCHEMA public FROM short")
    line = _startup_failure(pg_daemon(daemon_factory, "hidden", dsn), status=2)
    assert grants_in(line) == ["GRANT USAGE ON SCHEMA public TO short", *grants], line

    # The GRANTs as said, run as the owner: the daemon starts and every part works.
    for grant in grants_in(line):
        query(database, grant)
    daemon = pg_daemon(daemon_factory, "runtime", dsn).start()
    assert "lacks" not in daemon.log()
    serves_a_publisher_and_a_named_consumer(daemon)


@pytest.mark.timeout(180)
def test_a_role_with_only_the_privileges_the_daemon_checks_runs_every_part_of_it(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """What the start-up check asks for is enough: writes, every retention limit, named consumers
    (claim, ack, forget), queries and subscriptions, with no permission denied anywhere."""
    made_by_owner(daemon_factory, database)
    grants = [f"GRANT {', '.join(privileges)} ON {name} TO {{role}}" for name, privileges in RUNNING_NEEDS]
    dsn = runtime_role(database, "least", *grants)
    retention = {
        "max_age": "1h",
        "max_events_per_topic": 30,
        "max_bytes": "10MB",
        "dedup_horizon": "2h",
        "sweep_interval": 0.3,
    }
    daemon = pg_daemon(daemon_factory, "least", dsn, retention=retention, ordering={"window_ms": 0}).start()
    with Publisher(daemon.ack, ack_timeout=2.0, deadline=30.0) as publisher:
        publisher.publish_many(plan(100, 0.2, 2, 3, "l"))  # re-sends: duplicates found at write time
        publisher.flush(30)
        assert publisher.totals.acked == 100
    eventually(
        lambda: all(topic["count"] == 30 for topic in daemon.request({"op": "topics"})["topics"]),
        30,
        "the sweep trimmed each topic to 30",
    )
    (first,) = [
        topic["first_seq"] for topic in daemon.request({"op": "topics"})["topics"] if topic["topic"] == "topic-0"
    ]
    consumer = RawConsumer(daemon.subscribe)
    try:
        consumer.send({"op": "subscribe", "topic": "topic-0", "after": first - 1, "credit": 5, "name": "least"})
        assert consumer.receive()["op"] == "subscribed"
        cursor = consumer.events(5)[-1]["seq"]
        consumer.send({"op": "ack", "position": cursor})
        assert consumer.receive() == {"op": "acked", "position": cursor}
        consumer.send({"op": "unsubscribe", "forget": True})
        assert consumer.receive()["op"] == "unsubscribed"
    finally:
        consumer.close()
    assert daemon.request({"op": "consumers"}) == {"consumers": []}
    stats = daemon.stats()
    assert "cluster" in stats and "retention_error" not in stats and "storage_error" not in stats, stats
    assert daemon.request({"op": "health"}).get("status") == "ok"
    assert len(daemon.events()) == 60
    assert "permission denied" not in daemon.log() and "lacks" not in daemon.log()


@pytest.mark.timeout(180)
def test_privileges_revoked_while_the_daemon_writes_and_sweeps_are_named_and_nothing_is_lost(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """Before, health said "storage ... is unavailable: permission denied for table events", and
    retention "permission denied for table events": neither which privilege nor whose."""
    made_by_owner(daemon_factory, database)
    dsn = runtime_role(database, "writer", *DOCUMENTED_GRANTS)
    daemon = pg_daemon(
        daemon_factory,
        "writer",
        dsn,
        retention={"max_events_per_topic": 50, "sweep_interval": 0.3},
        ordering={"window_ms": 0},
    ).start()

    query(database, "REVOKE INSERT ON events FROM writer")
    with Publisher(daemon.ack, ack_timeout=2.0, deadline=120.0) as publisher:
        publisher.publish_many(plan(40, 0.0, 2, 1, "w"))

        def writes_refused() -> str | None:
            publisher.poll(0.05)  # sends the partial batch, and resends it
            error = daemon.request({"op": "health"}).get("error")
            return error if error is not None and "refuses this daemon's writes" in error else None

        error = eventually(writes_refused, 30, "health says the writes are refused", detail=daemon.log)
        assert "permission denied for table events: PostgreSQL role writer lacks INSERT on table public.events" in (
            error
        ), error
        assert "GRANT INSERT ON TABLE public.events TO writer" in error, error
        assert "lacks INSERT on table public.events" in daemon.stats()["storage_error"]
        assert publisher.totals.acked_new == 0
        query(database, "GRANT INSERT ON events TO writer")  # what it said: the held events commit
        publisher.flush(60)
        assert publisher.totals.acked_new == 40
    assert "error" not in daemon.request({"op": "health"})

    query(database, "REVOKE DELETE ON events FROM writer")
    with Publisher(daemon.ack, ack_timeout=2.0, deadline=60.0) as publisher:
        publisher.publish_many([dict(event, topic="over") for event in plan(60, 0.0, 1, 2, "o")])
        publisher.flush(60)

    def sweep_refused() -> str | None:
        error = daemon.stats().get("retention_error")
        return error if error is not None and "DELETE" in error else None

    error = eventually(sweep_refused, 30, "the sweep says it was refused")
    assert "PostgreSQL role writer lacks DELETE on table public.events" in error, error
    assert "GRANT DELETE ON TABLE public.events TO writer" in error, error
    query(database, "GRANT DELETE ON events TO writer")
    eventually(lambda: "retention_error" not in daemon.stats(), 30, "the sweep runs again")
    seqs = query(database, "SELECT topic, seq FROM events ORDER BY topic, seq")
    assert [seq for topic, seq in seqs if topic == "over"] == list(range(11, 61))
    written = sorted(seq for topic, seq in seqs if topic != "over")
    assert len(written) == 40 and query(database, "SELECT count(DISTINCT (topic, event_id)) FROM events") == [(90,)]
    assert daemon.proc is not None and daemon.proc.poll() is None


@pytest.mark.timeout(180)
def test_privileges_revoked_while_the_daemon_answers_queries_and_consumers_are_named(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """Before: a topics query answered "query failed: permission denied for table topics", stats
    failed altogether without SELECT on nodes, and a named consumer was refused with "permission
    denied for sequence consumer_claim_numbers" or "... for table consumers"."""
    made_by_owner(daemon_factory, database)
    dsn = runtime_role(database, "reader", *DOCUMENTED_GRANTS)
    daemon = pg_daemon(daemon_factory, "reader", dsn).start()
    with Publisher(daemon.ack, ack_timeout=2.0, deadline=30.0) as publisher:
        publisher.publish_many(plan(20, 0.0, 2, 4, "q"))
        publisher.flush(30)

    query(database, "REVOKE SELECT ON topics FROM reader")
    error = daemon.request({"op": "topics"})["error"]
    assert error.startswith("storage PostgreSQL 127.0.0.1:"), error
    assert "permission denied for table topics: PostgreSQL role reader lacks SELECT on table public.topics" in error
    assert "GRANT SELECT ON TABLE public.topics TO reader" in error, error
    query(database, "REVOKE SELECT ON nodes FROM reader")
    stats = daemon.stats()  # this daemon's own counters still, and why the cluster's are missing
    assert stats["unique_processed"] == 20 and "cluster" not in stats, stats
    assert "lacks SELECT on table public.topics; SELECT on table public.nodes" in stats["cluster_error"], stats
    query(database, "GRANT SELECT ON topics, nodes TO reader")
    assert len(daemon.request({"op": "topics"})["topics"]) == 2
    assert daemon.stats()["cluster"]["unique_processed"] == 20

    consumer = RawConsumer(daemon.subscribe)
    try:
        query(database, "REVOKE USAGE ON SEQUENCE consumer_claim_numbers FROM reader")
        consumer.send({"op": "subscribe", "topic": "topic-0", "credit": 5, "name": "billing"})
        refused = consumer.receive()
        assert refused["code"] == "unavailable", refused
        assert "lacks USAGE on sequence public.consumer_claim_numbers" in refused["error"], refused
        assert "GRANT USAGE ON SEQUENCE public.consumer_claim_numbers TO reader" in refused["error"], refused
        query(database, "GRANT USAGE ON SEQUENCE consumer_claim_numbers TO reader")

        consumer.send({"op": "subscribe", "topic": "topic-0", "credit": 5, "name": "billing"})
        assert consumer.receive()["op"] == "subscribed"
        cursor = consumer.events(5)[-1]["seq"]
        query(database, "REVOKE INSERT ON consumers FROM reader")
        consumer.send({"op": "ack", "position": cursor})
        refused = consumer.receive()
        assert refused["code"] == "ack_failed", refused
        assert "lacks INSERT on table public.consumers" in refused["error"], refused
        assert "GRANT INSERT ON TABLE public.consumers TO reader" in refused["error"], refused
        query(database, "GRANT INSERT ON consumers TO reader")
        consumer.send({"op": "ack", "position": cursor})
        assert consumer.receive() == {"op": "acked", "position": cursor}
    finally:
        consumer.close()
    assert [(c["name"], c["position"]) for c in daemon.request({"op": "consumers"})["consumers"]] == [("billing", 5)]
    assert "Traceback" not in daemon.log()


@pytest.mark.timeout(180)
def test_a_migration_by_a_role_that_does_not_own_the_tables_names_their_owner_and_eventagg_migrate(
    daemon_factory: Callable[..., Daemon], database: str, tmp_path: Path
) -> None:
    """Before: "cannot prepare ...: must be owner of table consumers" (exit 1, restarted in a
    loop), and `eventagg migrate` printed the same."""
    with made_at_version(database, 7):  # made by the owner; migration 8 adds a table and a sequence
        pass
    dsn = runtime_role(database, "older", *DOCUMENTED_GRANTS)
    line = _startup_failure(pg_daemon(daemon_factory, "older", dsn), status=2)
    assert "migrating the schema to version 8 needs the owner of eventagg's tables, PostgreSQL role postgres" in line
    assert "[storage] dsn connects as older" in line and "`eventagg migrate --config PATH`" in line, line

    def config(name: str, dsn: str) -> Path:
        storage = {"backend": "postgresql", "dsn": dsn, "node": name}
        return write_config(tmp_path / f"{name}.toml", {"storage": storage})

    refused = run_migrate(config("older", dsn))
    assert refused.returncode == 1 and "needs the owner of eventagg's tables, PostgreSQL role postgres" in (
        refused.stderr
    ), refused
    done = run_migrate(config("owner", database))  # as the owner, as it said
    assert done.returncode == 0, done.stderr
    # The tables the migration added are the owner's: the runtime role was granted nothing on them.
    added = [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE public.consumer_claims TO older",
        "GRANT USAGE ON SEQUENCE public.consumer_claim_numbers TO older",
    ]
    line = _startup_failure(pg_daemon(daemon_factory, "upgraded", dsn), status=2)
    assert grants_in(line) == added, line
    # So does a copy from SQLite made as that role (before: "migrate: permission denied for table
    # consumer_claims; the migration or copy under way was rolled back").
    sqlite = daemon_factory("sqlite").start()
    assert sqlite.terminate() == 0
    copy = run_migrate(config("older", dsn), "--from-sqlite", str(sqlite.db_path))
    assert copy.returncode == 1 and "permission denied for table consumer_claims: PostgreSQL role older lacks" in (
        copy.stderr
    ), copy
    assert grants_in(copy.stderr) == added, copy.stderr


@pytest.mark.timeout(60)
def test_a_role_that_may_not_create_the_tables_of_a_new_database_is_told_who_may(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """Before: "cannot prepare ...: permission denied for schema public" (exit 1)."""
    dsn = runtime_role(database, "early")
    line = _startup_failure(pg_daemon(daemon_factory, "early", dsn), status=2)
    assert "PostgreSQL role early may not create eventagg's tables in schema public (it lacks CREATE on it)" in line
    assert "as the database's owner" in line and "GRANT CREATE ON SCHEMA public TO early" in line, line
