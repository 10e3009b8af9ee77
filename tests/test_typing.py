"""The code's type annotations hold: mypy over actors/, transport/ and scripts/ finds nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import ROOT

pytest.importorskip("mypy", reason="mypy comes with the test extras: pip install -e .[test]")


@pytest.mark.timeout(300)
def test_mypy_finds_no_type_errors() -> None:
    # The files and options are in pyproject.toml's [tool.mypy], so this is exactly `mypy` there.
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
