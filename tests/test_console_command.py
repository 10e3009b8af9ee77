"""The ``eventagg`` command from a wheel installed (not editable) in a fresh virtualenv.

The wheel is built from a clean copy of the project; the virtualenv gets only that wheel
(``--no-deps``), and finds the dependencies (pykka, pyzmq, msgpack, msgspec) where this
interpreter finds them, through a ``.pth`` file: nothing is downloaded, so it runs offline
wherever the wheel can be built. Each subcommand's ``--help`` must work from there, and the
package must come from the virtualenv, not from this checkout.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT

from actors.cli import COMMANDS

pytestmark = pytest.mark.e2e  # it builds a wheel and runs the installed command

DEPENDENCIES = ("pykka", "zmq", "msgpack", "msgspec")


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the eventagg wheel; returns its bin folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("actors", "transport"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(work / "dist"), str(source)],
        cwd=work,
        timeout=240,
    )
    if built.returncode != 0:  # no index and no cached build backend: nothing to test the install with
        pytest.skip(f"cannot build the wheel here (pip needs setuptools for it):\n{built.stderr[-2000:]}")
    (wheel,) = (work / "dist").glob("eventagg-*.whl")

    venv = work / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=work)
    assert site.returncode == 0, site.stderr
    # This interpreter's copies of the dependencies, and only those folders (not this checkout).
    folders = sorted({str(Path(importlib.import_module(name).__file__ or "").parents[1]) for name in DEPENDENCIES})
    assert str(ROOT) not in folders
    Path(site.stdout.strip(), "eventagg-test-deps.pth").write_text("\n".join(folders) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index"]
    installed = run([*pip, str(wheel)], cwd=work)
    assert installed.returncode == 0, installed.stderr
    return venv / "bin"


def test_the_package_comes_from_the_wheel_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = run(
        [str(installed / "python"), "-c", "import actors, transport.commands; print(actors.__file__)"], tmp_path
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(installed.parent)), where.stdout


def test_eventagg_help_lists_every_command(installed: Path, tmp_path: Path) -> None:
    result = run([str(installed / "eventagg"), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("run", "stats", "events", "publish", "keys"):
        assert name in COMMANDS
        assert name in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_its_help(installed: Path, tmp_path: Path, command: str) -> None:
    result = run([str(installed / "eventagg"), command, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: eventagg {command}"), result.stdout


def test_an_unknown_command_is_named(installed: Path, tmp_path: Path) -> None:
    result = run([str(installed / "eventagg"), "frobnicate"], tmp_path)
    assert result.returncode == 2
    assert "frobnicate" in result.stderr
