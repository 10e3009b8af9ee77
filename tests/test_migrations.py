"""The schema migration mechanism: steps run in order, each committed with its version; unknown
versions are refused before anything is written."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from actors import migrations
from actors.migrations import Step
from actors.store import StorageError, connect_writer


def version(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    finally:
        conn.close()


def test_a_new_database_gets_the_current_version_and_runs_no_step(tmp_path: Path) -> None:
    connect_writer(tmp_path / "db").close()
    assert version(tmp_path / "db") == str(migrations.SCHEMA_VERSION)


def test_an_added_step_migrates_an_older_database_and_a_failing_step_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    connect_writer(path).close()
    # How another feature adds a table: one more step, the version follows.
    steps = [*migrations.STEPS, Step(3, "a table for a new feature", "CREATE TABLE extra (a INTEGER);")]
    monkeypatch.setattr(migrations, "STEPS", steps)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", 3)
    connect_writer(path).close()
    assert version(path) == "3"
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM extra").fetchone() == (0,)
    conn.close()
    broken = [*steps, Step(4, "broken", "CREATE TABLE extra (a INTEGER);")]  # the table exists: fails
    monkeypatch.setattr(migrations, "STEPS", broken)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", 4)
    with pytest.raises(StorageError, match="migrating schema 3 -> 4 failed"):
        connect_writer(path)
    assert version(path) == "3"
