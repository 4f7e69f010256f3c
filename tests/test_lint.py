"""The code passes ``ruff check`` with the rules in pyproject.toml (pycodestyle, pyflakes, import order, bugbear,
pyupgrade; lines up to 120 characters). ruff comes with the dev extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    try:
        import ruff  # noqa: F401 - the pip package ships the binary

        return [sys.executable, "-m", "ruff"]
    except ImportError:
        if shutil.which("ruff"):
            return ["ruff"]
    pytest.fail("ruff is not installed: pip install -e '.[dev]'")


def test_ruff_check_is_clean():
    result = subprocess.run([*_ruff(), "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
