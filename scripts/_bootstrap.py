"""Lets a script run from a checkout: puts the repository root on sys.path if the packages are not installed."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import actors  # noqa: F401
    import transport  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
