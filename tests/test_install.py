"""scripts/install.sh and scripts/uninstall.sh into a staging root: a working installation, twice, then gone.

The real scripts run: they make a real virtualenv and pip-install the project (pip's configured
index or wheel cache keeps it quick), and the installed daemon runs from the installed config
with ``$STATE_DIRECTORY`` set as systemd would set it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ROOT, eventually, free_port, publish

from transport.client import NoAnswer, QueryClient

pytestmark = pytest.mark.e2e  # it installs into a staging root and starts the installed daemon

INSTALL = ROOT / "scripts" / "install.sh"
UNINSTALL = ROOT / "scripts" / "uninstall.sh"


def run(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        ["bash", str(script), *args], check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd="/"
    )
    assert result.returncode == 0, f"{script.name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A staging root with eventagg installed once."""
    root = tmp_path_factory.mktemp("stage")
    result = run(INSTALL, "--prefix", str(root))
    assert "systemctl daemon-reload skipped" in result.stdout
    yield root


def installed_python(prefix: Path) -> Path:
    return prefix / "opt/eventagg/venv/bin/python"


def use_free_ports(config: Path) -> dict[str, str]:
    """Point the installed config at free loopback ports, as an operator edits it; returns the endpoints."""
    endpoints = {
        "tcp://127.0.0.1:5555": f"tcp://127.0.0.1:{free_port()}",
        "tcp://127.0.0.1:5557": f"tcp://127.0.0.1:{free_port()}",
        "tcp://127.0.0.1:5556": f"tcp://127.0.0.1:{free_port()}",
        "tcp://127.0.0.1:5558": f"tcp://127.0.0.1:{free_port()}",
    }
    text = config.read_text()
    for default, chosen in endpoints.items():
        assert f'"{default}"' in text, f"{default} not in the shipped config"
        text = text.replace(f'"{default}"', f'"{chosen}"')
    config.write_text(text)
    return {"ingest": endpoints["tcp://127.0.0.1:5555"], "query": endpoints["tcp://127.0.0.1:5556"]}


def wait_healthy(endpoint: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, f"installed daemon exited with {proc.returncode}:\n{log.read_text()}"
        try:
            with QueryClient(endpoint, timeout=1.0) as client:
                return bool(client.request({"op": "health"}).get("status") == "ok")
        except NoAnswer:
            return False

    eventually(healthy, timeout, "the installed daemon answers health with ok")


def test_install_lays_out_a_working_installation(prefix: Path, tmp_path: Path) -> None:
    opt, etc = prefix / "opt/eventagg", prefix / "etc/eventagg"
    assert (etc / "config.toml").read_text() == (ROOT / "config.toml").read_text()
    unit = prefix / "etc/systemd/system/eventagg.service"
    assert unit.read_text() == (ROOT / "scripts/systemd/eventagg.service").read_text()
    for script in (
        "aggregatord.py",
        "stats.py",
        "health.py",
        "events.py",
        "topics.py",
        "consumers.py",
        "publish.py",
        "keys.py",
        "migrate.py",
    ):
        assert (opt / "scripts" / script).is_file()
        # Run by path, they find the installation's packages: the first line names its python.
        assert (opt / "scripts" / script).read_text().splitlines()[0] == f"#!{opt / 'venv/bin/python'}"
    # Development tools stay in the checkout: nothing installed imports the tests.
    for tool in ("_bootstrap.py", "bench.py", "peers.py", "dev.py"):
        assert not (opt / "scripts" / tool).exists(), tool
    assert (opt / "venv/bin/eventagg").is_file()
    assert (opt / "README.md").is_file() and (opt / "docs/protocol.md").is_file()  # the unit's Documentation=
    (site,) = (opt / "venv/lib").glob("python3*/site-packages")
    ours = [*(opt / "scripts").glob("*.py"), *(site / "actors").rglob("*.py"), *(site / "transport").rglob("*.py")]
    assert len(ours) > 20
    assert [path for path in ours if "harness" in path.read_text()] == []
    # PEP 561: an application's `mypy --strict` reads the libraries' type hints.
    assert (site / "transport/py.typed").is_file() and (site / "actors/py.typed").is_file()
    # The packages come from the virtualenv, not from this checkout.
    where = subprocess.run(
        [str(installed_python(prefix)), "-c", "import actors, transport; print(actors.__file__)"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(opt / "venv")), where.stdout

    config = etc / "config.toml"
    endpoints = use_free_ports(config)
    state = tmp_path / "state"  # what StateDirectory=eventagg gives the service
    state.mkdir()
    log = tmp_path / "daemon.log"
    env = {"PATH": os.environ["PATH"], "STATE_DIRECTORY": str(state), "JOURNAL_STREAM": "8:1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(opt / "venv/bin/eventagg"), "run", "--config", str(config)],  # what the unit runs
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
    try:
        wait_healthy(endpoints["query"], proc, log)
        publish(endpoints["ingest"], "--events", "500", "--duplicates", "0.2", "--topics", "4")
        stats = subprocess.run(
            [str(opt / "scripts/stats.py"), "--config", str(config), "--json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"]},
        )
        assert stats.returncode == 0, stats.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    database = state / "data" / "events.db"  # the shipped relative [storage] path, under $STATE_DIRECTORY
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 400
    finally:
        conn.close()
    assert "<6>actors.daemon: eventagg ready" in log.read_text()


def test_reinstall_keeps_an_edited_config_then_uninstall_removes_all_but_config_and_data(prefix: Path) -> None:
    config = prefix / "etc/eventagg/config.toml"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    edited = config.read_text()
    venv_marker = installed_python(prefix).resolve()

    result = run(INSTALL, "--prefix", str(prefix))
    assert "using the virtualenv" in result.stdout
    assert "kept your edited" in result.stdout
    assert config.read_text() == edited
    assert not (prefix / "etc/eventagg/config.toml.dist").exists()  # the default did not change
    assert installed_python(prefix).resolve() == venv_marker
    assert (prefix / "opt/eventagg/scripts/aggregatord.py").is_file()

    # A changed default goes beside an edited config, for the operator to compare.
    stamp = prefix / "opt/eventagg/.config-default.sha256"  # the default install.sh installed last
    stamp.write_text("0" * 64 + "\n")
    result = run(INSTALL, "--prefix", str(prefix))
    assert "kept your edited" in result.stdout and "compare" in result.stdout
    assert config.read_text() == edited
    assert (config.parent / "config.toml.dist").read_text() == (ROOT / "config.toml").read_text()

    # An unedited config (it matches the default installed last) follows the new default.
    config.write_text("# an older default\n")
    stamp.write_text(hashlib.sha256(config.read_bytes()).hexdigest() + "\n")
    result = run(INSTALL, "--prefix", str(prefix))
    assert "updated the unedited" in result.stdout
    assert config.read_text() == (ROOT / "config.toml").read_text()
    config.write_text(edited)

    (prefix / "var/lib/private/eventagg").mkdir(parents=True)  # data left by a DynamicUser service
    result = run(UNINSTALL, "--prefix", str(prefix))
    assert not (prefix / "opt/eventagg").exists()
    assert not (prefix / "etc/systemd/system/eventagg.service").exists()
    assert config.read_text() == edited
    assert "kept the data" in result.stdout
    run(UNINSTALL, "--prefix", str(prefix))  # again: nothing left to do, still fine
    run(UNINSTALL, "--prefix", str(prefix), "--purge")
    assert not (prefix / "etc/eventagg").exists()
    assert not (prefix / "var/lib/private/eventagg").exists()
