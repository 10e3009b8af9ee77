"""Shared fixtures: a factory of real daemon processes, cleaned up after each test, and a
throwaway PostgreSQL server per module with a fresh database per test."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from harness import GATEWAY_TIMEOUT_MS, Daemon, Gateway, free_port
from pg_cluster import PgCluster

PROCESS_FIXTURES = {"daemon", "daemon_factory", "gateway", "gateway_factory"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts a daemon must carry the e2e marker, so `dev.py test --fast` stays fast."""
    unmarked = [
        item.nodeid
        for item in items
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("e2e") is None
    ]
    if unmarked:
        raise pytest.UsageError("mark these with @pytest.mark.e2e (they start processes):\n" + "\n".join(unmarked))


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make daemons (not yet started) under this test's tmp_path; all are killed at teardown."""
    made: list[Daemon] = []

    def make(name: str = "daemon", **overrides: dict[str, Any]) -> Daemon:
        daemon = Daemon(tmp_path / name, overrides)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.cleanup()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """One started daemon with default settings."""
    return daemon_factory().start()


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    """No in-process test leaks actor threads into the next."""
    yield
    pykka.ActorRegistry.stop_all(timeout=10)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL server for the whole module, removed at its end."""
    cluster = PgCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def database(pg: PgCluster, request: pytest.FixtureRequest) -> str:
    """A fresh database for this test; its dsn."""
    return pg.create_database(re.sub(r"\W", "_", request.node.name)[:60])


@pytest.fixture
def gateway_factory(daemon_factory: Callable[..., Daemon]) -> Iterator[Callable[..., Gateway]]:
    """Make a daemon with an [http] section and a gateway for it (started; ``without`` these modules,
    with these ``constants`` of transport.gateway, see harness.Gateway); all stopped at teardown."""
    made: list[Gateway] = []

    def make(
        start_daemon: bool = True,
        without: tuple[str, ...] = (),
        constants: dict[str, Any] | None = None,
        **overrides: dict[str, Any],
    ) -> Gateway:
        port = free_port()
        http = {"bind": f"127.0.0.1:{port}", "request_timeout_ms": GATEWAY_TIMEOUT_MS, **overrides.pop("http", {})}
        # The daemon gets the [http] section too: it must accept it and leave it to the gateway.
        daemon = daemon_factory(http=http, **overrides)
        if start_daemon:
            daemon.start()
        port = int(http["bind"].rsplit(":", 1)[1])  # a test's own bind (0.0.0.0) serves loopback too
        gateway = Gateway(daemon, f"http://127.0.0.1:{port}", without, constants)
        made.append(gateway)
        return gateway.start()

    yield make
    for gateway in made:
        gateway.stop()


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory()
