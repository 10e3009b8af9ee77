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
    added = migrations.SCHEMA_VERSION + 1
    steps = [*migrations.STEPS, Step(added, "a table for a new feature", "CREATE TABLE extra (a INTEGER);")]
    monkeypatch.setattr(migrations, "STEPS", steps)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", added)
    connect_writer(path).close()
    assert version(path) == str(added)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM extra").fetchone() == (0,)
    conn.close()
    # The table exists already, so this step fails.
    broken = [*steps, Step(added + 1, "broken", "CREATE TABLE extra (a INTEGER);")]
    monkeypatch.setattr(migrations, "STEPS", broken)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", added + 1)
    with pytest.raises(StorageError, match=f"migrating schema {added} -> {added + 1} failed"):
        connect_writer(path)
    assert version(path) == str(added)
