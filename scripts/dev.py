#!/usr/bin/env python3
"""The two quick-start commands, needing nothing but python3 ≥ 3.11.

``python3 scripts/dev.py run [--config PATH]`` runs the daemon on ``config.toml``;
``python3 scripts/dev.py test [--fast] [PYTEST ARGS]`` runs the test suite (``--fast``: only the tests
that start no process, ``-m "not e2e"``);
``python3 scripts/dev.py lint`` runs ruff (lint and format check) and mypy --strict. Each first makes a
virtualenv in ``.venv`` and installs the project into it (again only when pyproject.toml changed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
STAMP = VENV / ".eventagg-installed"
# More workers would each start their own daemons and PostgreSQL cluster for little gain: the
# longest tests alone take about a minute in all.
MAX_TEST_WORKERS = 4


def python_in_venv() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> Path:
    """Create .venv and install the project with its test extras, once per pyproject.toml version."""
    if sys.version_info < (3, 11):  # noqa: UP036 (this script must run on an older python3 to say so)
        sys.exit(f"eventagg needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    python = python_in_venv()
    if python.exists() and STAMP.exists() and STAMP.read_text() == want:
        return python
    if not python.exists():
        print(f"dev: creating a virtualenv in {VENV}", file=sys.stderr)
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        except (subprocess.CalledProcessError, OSError) as exc:
            sys.exit(f"dev: cannot create a virtualenv ({exc}); on Debian/Ubuntu: apt-get install python3-venv")
    print("dev: installing eventagg and its dependencies into .venv", file=sys.stderr)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f"{ROOT}[dev]"],
        check=True,
    )
    STAMP.write_text(want)
    return python


def test_workers() -> list[str]:
    """pytest-xdist's worker count: one per CPU this process may use, up to MAX_TEST_WORKERS.

    Most tests wait on daemons, sockets and databases rather than compute, so two workers on two
    CPUs took the suite from 675 to 389 s, and one worker more than the CPUs took the grown suite
    from 590 to 436 s on two CPUs. A later ``-n`` in the command's own arguments wins
    (``-n 0`` runs the tests in this process, as a debugger or ``-s`` needs).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    workers = min(cpus + 1, MAX_TEST_WORKERS) if cpus > 1 else 1
    return ["-n", str(workers)] if workers > 1 else []


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test", "lint"):
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    python = ensure_venv()
    os.chdir(ROOT)
    if command == "run":
        if "--config" not in rest:
            rest = ["--config", str(ROOT / "config.toml"), *rest]
        args = [str(python), str(ROOT / "scripts" / "aggregatord.py"), *rest]
    elif command == "lint":
        for check in (["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]):
            print("dev: " + " ".join(check), file=sys.stderr)
            if subprocess.run([str(python), "-m", *check]).returncode != 0:
                return 1
        return 0
    else:
        if "--fast" in rest:
            rest = ["-m", "not e2e", *(arg for arg in rest if arg != "--fast")]
        args = [str(python), "-m", "pytest", *test_workers(), *rest]
    os.execv(args[0], args)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
