"""The TabbyAPI path through the real proxy.py, against tests/fake_tabby.py (TabbyAPI's contract on a CPU):
launch and generated config, readiness with a slow bind, failures during load, the port+1 trap, auth to
the backend, TabbyAPI's error forms through both APIs, and the in-place swap of resident groups.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.backends.tabby import tabby_config
from proxy.config import load_config
from tests.conftest import ProxyProcess, write_config
from tests.fake_tabby import make_tabby_dir

Start = Callable[..., ProxyProcess]
GOLDEN = Path(__file__).with_name("golden")


def tabby_profile(model_name: str, **stand_in: Any) -> dict[str, Any]:
    return {"backend": "tabbyapi", "startup_timeout": 20,
            "model": {"model_name": model_name, "max_seq_len": 4096, "cache_mode": "Q8"},
            "network": {"sse_ping_interval": 0.2},
            "tabby_config": {"stand_in": {"load_delay": 0.2, **stand_in}}}


@pytest.fixture
def tabby_dir(tmp_path: Path) -> Path:
    return make_tabby_dir(tmp_path / "tabbyAPI", models=("m1", "m2"),
                          tokens={"api_key": "tabby-api-key-0000", "admin_key": "tabby-admin-key-0000"})


def start_tabby(start_proxy: Start, tabby_dir: Path, profiles: dict[str, dict[str, Any]],
                **proxy: Any) -> ProxyProcess:
    return start_proxy(profiles, proxy={"tabby_dir": str(tabby_dir), **proxy})


@pytest.mark.parametrize("name", ["qwen-exl3", "with-draft"])
def test_generated_config_matches_the_golden_file(tmp_path: Path, name: str) -> None:
    base = yaml.safe_load((GOLDEN / "tabby-config.yml").read_text())
    profile = yaml.safe_load((GOLDEN / f"{name}.profile.yml").read_text())
    config = load_config(write_config(tmp_path, {name: profile}, tabby=base))
    generated = tabby_config(config.models[name], 5123)
    assert generated == yaml.safe_load((GOLDEN / f"{name}.generated.yml").read_text())


def test_chat_through_both_apis_with_a_slow_bind(start_proxy: Start, tabby_dir: Path) -> None:
    proxy = start_tabby(start_proxy, tabby_dir, {"qwen": tabby_profile("m1", load_delay=1.0)})
    started = time.monotonic()
    answer = proxy.chat("qwen")
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - started >= 1.0  # waited through "connection refused" while loading
    assert answer.json()["echo"]["model"] == "m1"  # the backend's folder name upstream
    assert answer.json()["model"] == "qwen"        # the public name back to the client
    assert answer.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "

    streamed = proxy.chat("qwen", stream=True)
    body = streamed.content
    assert b"[DONE]" in body and b"tok4" in body

    ollama = proxy.post("/api/chat", {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
    records = [json.loads(line) for line in ollama.content.splitlines()]
    assert all(record["message"]["role"] == "assistant" for record in records)  # TabbyAPI sends no role
    assert "".join(record["message"]["content"] for record in records) == "tok0 tok1 tok2 tok3 tok4 "
    done = records[-1]
    assert done["done"] is True and done["eval_count"] == 5
    generated = yaml.safe_load((proxy.config_path.parent / "run" / "tabby" / "qwen.yml").read_text())
    assert generated["network"]["disable_auth"] is True and generated["model"]["model_name"] == "m1"


def test_crash_during_load_fails_fast_with_its_output(start_proxy: Start, tabby_dir: Path) -> None:
    proxy = start_tabby(start_proxy, tabby_dir, {"broken": tabby_profile("m1", exit_during_load="CUDA out of memory")})
    started = time.monotonic()
    response = proxy.chat("broken")
    assert response.status_code == 502 and time.monotonic() - started < 10
    message = response.json()["error"]["message"]
    assert "broken" in message and "CUDA out of memory" in message
    missing = start_tabby(start_proxy, tabby_dir, {"nofolder": tabby_profile("not-there")})
    assert "Could not find the model path" in missing.chat("nofolder").json()["error"]["message"]


def test_hung_load_times_out_and_the_child_is_stopped(start_proxy: Start, tabby_dir: Path) -> None:
    proxy = start_tabby(start_proxy, tabby_dir,
                        {"hung": {**tabby_profile("m1", hang_during_load=True), "startup_timeout": 1}})
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: holder.setdefault("r", proxy.chat("hung")))
    thread.start()
    time.sleep(0.5)
    assert len(proxy.backends()) >= 1
    thread.join(15)
    assert holder["r"].status_code == 504
    assert proxy.surviving_backends() == []


class _Impostor(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"id": "someone-else", "object": "model"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def impostor_factory() -> Iterator[Callable[[int], None]]:
    servers: list[ThreadingHTTPServer] = []

    def start(port: int) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", port), _Impostor)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_port_taken_during_load_is_detected_not_trusted(start_proxy: Start, tabby_dir: Path,
                                                       impostor_factory: Callable[[int], None]) -> None:
    # TabbyAPI checks its port, loads for a while, then binds; if another server takes the port
    # meanwhile, a supervisor that trusts "the port answers" talks to the wrong server.
    proxy = start_tabby(start_proxy, tabby_dir, {"qwen": tabby_profile("m1", load_delay=1.5)})
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: holder.setdefault("r", proxy.chat("qwen")))
    thread.start()
    proxy.wait_for(lambda: proxy.status("qwen")["port"] is not None, timeout_s=5, what="a port")
    port = proxy.status("qwen")["port"]
    impostor_factory(port)  # the stand-in then moves to port+1, as TabbyAPI does
    thread.join(20)
    response = holder["r"]
    assert response.status_code == 502
    assert "someone-else" in response.json()["error"]["message"]
    assert proxy.surviving_backends() == []


def test_backend_keys_are_used_and_client_keys_are_not_forwarded(start_proxy: Start, tabby_dir: Path) -> None:
    proxy = start_tabby(start_proxy, tabby_dir, {"qwen": tabby_profile("m1")}, tabby_auth="keys")
    answer = proxy.chat("qwen")
    assert answer.status_code == 200, answer.text  # the stand-in refuses anything but its own keys
    generated = yaml.safe_load((proxy.config_path.parent / "run" / "tabby" / "qwen.yml").read_text())
    assert generated["network"]["disable_auth"] is False
    port = proxy.status("qwen")["port"]
    with socket.create_connection(("127.0.0.1", port)) as raw:  # the backend itself still wants a key
        raw.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b" 401 " in raw.recv(200)


def test_tabby_error_forms_through_both_apis(start_proxy: Start, tabby_dir: Path) -> None:
    proxy = start_tabby(start_proxy, tabby_dir, {
        "qwen": tabby_profile("m1"),
        "flaky": tabby_profile("m2", stream_error_after=2),
    }, max_loaded_models=2)
    invalid = proxy.post("/v1/chat/completions", {"model": "qwen", "messages": None})
    assert invalid.status_code == 400  # the proxy validates before TabbyAPI's 422 could happen

    broken_stream = proxy.chat("flaky", stream=True).content
    assert b"aborted" in broken_stream and b"[DONE]" not in broken_stream  # relayed as TabbyAPI sent it
    ollama = proxy.post("/api/chat", {"model": "flaky", "messages": [{"role": "user", "content": "x"}]})
    last = json.loads(ollama.content.splitlines()[-1])
    assert "aborted" in last["error"] and "done" not in last

    ollama_whole = proxy.post("/api/chat", {"model": "flaky", "stream": False,
                                            "messages": [{"role": "user", "content": "x"}]})
    assert ollama_whole.status_code == 502 and "aborted" in ollama_whole.json()["error"]


def test_resident_group_swaps_in_place(start_proxy: Start, tabby_dir: Path) -> None:
    proxy = start_tabby(start_proxy, tabby_dir, {
        "first": {**tabby_profile("m1"), "resident_group": "gpu0"},
        "second": {**tabby_profile("m2"), "resident_group": "gpu0"},
    })
    assert proxy.chat("first").json()["echo"]["model"] == "m1"
    pid = proxy.status("first")["pid"]
    started = time.monotonic()
    assert proxy.chat("second").json()["echo"]["model"] == "m2"
    assert proxy.status("second")["pid"] == pid  # the same process: swapped over the admin API
    assert time.monotonic() - started < 5
    assert "unloaded in place" in proxy.log()
    assert proxy.chat("first").json()["echo"]["model"] == "m1"
    assert proxy.status("first")["pid"] == pid
    assert len(proxy.backends()) == 1

    assert proxy.get("/unload", admin=True).json() == {"unloaded": ["first"]}  # not a swap: the process goes
    proxy.wait_for(lambda: proxy.backends() == [], timeout_s=5, what="resident process stopped")


def test_failed_in_place_load_falls_back_to_a_fresh_process(start_proxy: Start, tabby_dir: Path) -> None:
    proxy = start_tabby(start_proxy, tabby_dir, {
        "first": {**tabby_profile("m1", load_fail_models=["m2"]), "resident_group": "gpu0"},
        "second": {**tabby_profile("m2", load_fail_models=["m2"]), "resident_group": "gpu0"},
    })
    assert proxy.chat("first").status_code == 200
    old_pid = proxy.status("first")["pid"]
    answer = proxy.chat("second")
    assert answer.status_code == 200, answer.text
    assert answer.json()["echo"]["model"] == "m2"
    assert proxy.status("second")["pid"] != old_pid
    assert "in-place load failed" in proxy.log()
    backends = proxy.backends()
    assert len(backends) == 1 and backends[0].pid == proxy.status("second")["pid"]


def test_in_place_load_progress_shows_in_status(start_proxy: Start, tabby_dir: Path) -> None:
    proxy = start_tabby(start_proxy, tabby_dir, {
        "first": {**tabby_profile("m1", load_delay=1.5), "resident_group": "gpu0"},
        "second": {**tabby_profile("m2", load_delay=1.5), "resident_group": "gpu0"},
    })
    assert proxy.chat("first").status_code == 200
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: holder.setdefault("r", proxy.chat("second")))
    thread.start()
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        progress = proxy.status("second")["progress"]
        if progress:
            seen.append(progress)
        time.sleep(0.05)
    thread.join(10)
    assert holder["r"].status_code == 200
    assert seen and seen[0].startswith("loading")
    assert proxy.status("second")["progress"] is None
