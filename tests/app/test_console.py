"""Piped CLI output keeps table rows whole; a terminal or COLUMNS decides otherwise."""

import os
import subprocess
import sys

from app.console import PIPED_WIDTH

PRINT_WIDTH = "from app.console import console; print(console.width)"


def piped_width(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | env
    out = subprocess.run(
        [sys.executable, "-c", PRINT_WIDTH], capture_output=True, text=True, env=clean, check=True
    )
    return int(out.stdout)


def test_piped_output_is_wider_than_rich_default():
    assert piped_width() == PIPED_WIDTH > 80


def test_columns_still_decides():
    assert piped_width(COLUMNS="100") == 100
