"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary folder, on a free port.

initdb refuses to run as root, so when the tests run as root the cluster's folder is given to
the ``postgres`` user and every server command runs as that user (``runuser``). The server
listens on 127.0.0.1 only, trusts local connections, and keeps its socket in its own folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import free_port


def find_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    return None


def missing_reason() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    if find_bin() is None:
        return "PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root without runuser to run initdb as the postgres user"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'eventagg[postgresql]')"
    return None


class PgCluster:
    """One PostgreSQL server of the tests' own; :meth:`start`/:meth:`stop` may be repeated."""

    def __init__(self, fsync: bool = False) -> None:
        """``fsync`` off (the default) makes the tests faster; commits are as synchronous as ever."""
        bin_dir = find_bin()
        assert bin_dir is not None
        self.bin = bin_dir
        self.port = free_port()
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="eventagg-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "server.log"
        self.socket_dir.mkdir()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.root.chmod(0o755)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)

    def init(self) -> None:
        """initdb (trust authentication, superuser ``postgres``)."""
        result = self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        assert result.returncode == 0, f"initdb failed:\n{result.stdout}\n{result.stderr}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        fsync = "on" if self.fsync else "off"
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.socket_dir} -c fsync={fsync} -c max_connections=100"
        )
        result = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )
        assert result.returncode == 0, f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{self.server_log()}"

    def stop(self) -> None:
        """Stop the server at once (fast mode: open sessions are cut, as in an outage)."""
        result = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        assert result.returncode == 0, f"pg_ctl stop failed:\n{result.stdout}\n{result.stderr}"

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A fresh database; its dsn."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server hung, not down: every process of it stopped (SIGSTOP), sockets left open."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        pids = [postmaster, *map(int, children)]  # the postmaster first: it forks no more
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def destroy(self) -> None:
        if self.data.exists() and self.running():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def made_at_version(database: str, version: int) -> Iterator[Any]:
    """A connection to ``database`` with the schema as the release at ``version`` left it."""
    import psycopg

    from actors.postgres import MIGRATIONS

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE eventagg_schema (version integer PRIMARY KEY, applied_at timestamptz"
            " NOT NULL DEFAULT now(), applied_by text NOT NULL)"
        )
        for applied, step in enumerate(MIGRATIONS[:version], start=1):
            conn.execute(step)
            conn.execute("INSERT INTO eventagg_schema (version, applied_by) VALUES (%s, 'old')", (applied,))
        yield conn
