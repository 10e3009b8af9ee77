"""Shared fixtures: a factory of real daemon processes, cleaned up after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from harness import Daemon


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
