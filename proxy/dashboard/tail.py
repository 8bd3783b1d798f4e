"""The end of a backend's log file (`state_dir/logs/<model>.log`, written by proxy/supervisor.py) for
the dashboard's admins: a bounded read from the end of the file, never the whole file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TAIL_LINES = 50
TAIL_BYTES = 64 * 1024     # read at most this much from the end, however long the lines
LINE_CHARS = 2000          # a longer line is cut (a progress bar without newlines, a huge traceback line)
# Terminal escapes (colours, cursor moves) and other control characters, tab excepted: they mean
# nothing in a page. The page escapes what remains.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


def log_path(state_dir: Path, model: str) -> Path | None:
    """Return the log file of a model as the supervisor names it, or None for a name that is not a plain file name."""
    directory = state_dir / "logs"
    path = directory / f"{model}.log"
    if "/" in model or "\\" in model or model in ("", ".", "..") or path.parent != directory:
        return None
    return path


def tail_lines(path: Path, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> list[str]:
    """Return the last `lines` lines of a text file (empty when it does not exist), reading at most
    max_bytes from its end. A line cut by that window is dropped (unless it is all there is); a carriage return keeps what
    came after it (the last state of a progress bar)."""
    try:
        with path.open("rb") as source:
            size = os.fstat(source.fileno()).st_size
            start = max(0, size - max_bytes)
            source.seek(start)
            chunk = source.read(max_bytes)
    except FileNotFoundError:
        return []
    text = chunk.decode("utf-8", errors="replace")
    found = text.split("\n")
    if start > 0 and len(found) > 1:
        found = found[1:]  # the first one began before the window (unless the window is all one line)
    if found and found[-1] == "":
        found.pop()
    cleaned = [_CONTROL.sub("", line.rstrip("\r").rsplit("\r", 1)[-1])[:LINE_CHARS] for line in found]
    return cleaned[-lines:] if lines > 0 else []
