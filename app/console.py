"""The CLI's consoles. Output that is not a terminal (a log file, a pipe) gets
wide lines, so table rows stay whole: rich would fold them to 80 columns there.
COLUMNS, when set, still decides."""

import os
import sys

from rich.console import Console

PIPED_WIDTH = 200


def _width(stream) -> int | None:
    return None if stream.isatty() or "COLUMNS" in os.environ else PIPED_WIDTH


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))
