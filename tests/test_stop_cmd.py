"""`command.stop_cmd`: a backend that is not the proxy's child (a container) is stopped by its own
command, with macros; when the command does not stop it, the signals still do. Real proxy.py, a fake
"container" (tests/fake_container.py) and fake backends; the process table is checked after each stop.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import FAKE_BACKEND, ProxyProcess, fake_profile, wait_until

Start = Callable[..., ProxyProcess]
CONTAINER = Path(__file__).with_name("fake_container.py")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def container_profile(state: Path) -> dict[str, object]:
    server = [sys.executable, str(FAKE_BACKEND), "--port", "${PORT}", "--model", "${MODEL}"]
    return {"backend": "command", "command": {
        "cmd": [sys.executable, str(CONTAINER), "run", str(state), "${MODEL}-${PORT}", "--", *server],
        "stop_cmd": [sys.executable, str(CONTAINER), "stop", str(state), "${MODEL}-${PORT}"],
    }}


def test_a_container_backend_is_stopped_by_its_stop_command(start_proxy: Start, tmp_path: Path) -> None:
    proxy = start_proxy({"boxed": container_profile(tmp_path)})
    assert proxy.chat("boxed").status_code == 200
    port = proxy.status("boxed")["port"]
    record = json.loads((tmp_path / f"boxed-{port}.json").read_text())
    assert alive(record["server"]) and os.getsid(record["server"]) != os.getsid(record["client"])

    assert proxy.get("/unload", admin=True).json() == {"unloaded": ["boxed"]}

    assert (tmp_path / "stops.log").read_text() == f"boxed-{port} {record['server']}\n"  # the macros expanded
    wait_until(lambda: not alive(record["server"]) and not alive(record["client"]), what="the container gone")
    assert "sending signals" not in proxy.log()


def test_when_the_stop_command_does_not_stop_it_the_signals_do(start_proxy: Start) -> None:
    profile = fake_profile(command={"cmd": [sys.executable, str(FAKE_BACKEND), "--port", "${PORT}", "--model",
                                            "${MODEL}"], "stop_cmd": "false"})
    proxy = start_proxy({"plain": profile}, proxy={"stop_grace": 1})
    assert proxy.chat("plain").status_code == 200
    pid = proxy.status("plain")["pid"]

    assert proxy.get("/unload", admin=True).json() == {"unloaded": ["plain"]}

    assert not alive(pid)
    log = proxy.log()
    assert "stop_cmd exited with 1" in log and "still runs after stop_cmd" in log


@pytest.mark.parametrize("stop_cmd", [[], "", ["docker", {"a": 1}], "stop ${NAME}"])
def test_a_bad_stop_command_is_a_config_error(tmp_path: Path, stop_cmd: object) -> None:
    from proxy.config import ConfigError, load_config
    from tests.conftest import write_config

    path = write_config(tmp_path, {"a": {"backend": "command", "command": {"cmd": "s ${PORT}", "stop_cmd": stop_cmd}}})
    with pytest.raises(ConfigError, match="command.stop_cmd"):
        load_config(path)
