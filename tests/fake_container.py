"""A stand-in for `docker run` / `docker stop`, for stop_cmd tests: the server runs outside the
caller's session (as a container runs under its daemon, not under the CLI), so only `stop` ends it.

  fake_container.py run STATE NAME -- SERVER ARGV...   start the server detached, wait while it runs
  fake_container.py stop STATE NAME                    record the stop, end the server, wait till it is gone
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run(state: Path, name: str, argv: list[str]) -> int:
    server = subprocess.Popen(argv, start_new_session=True)  # its own session: the caller's signals miss it
    (state / f"{name}.json").write_text(json.dumps({"server": server.pid, "client": os.getpid()}))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like an attached CLI that does not forward the signal
    return server.wait()


def stop(state: Path, name: str) -> int:
    record = json.loads((state / f"{name}.json").read_text())
    with (state / "stops.log").open("a") as log:
        log.write(f"{name} {record['server']}\n")
    os.kill(record["server"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(record["server"], 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.05)
    return 1


def main() -> int:
    command, state, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    if command == "run":
        return run(state, name, sys.argv[sys.argv.index("--") + 1:])
    return stop(state, name)


if __name__ == "__main__":
    sys.exit(main())
