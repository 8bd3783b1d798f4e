"""The TabbyAPI path through the real proxy.py against TabbyAPI's real server code (the test bed in
shared/tabbyapi-testbed: TabbyAPI unmodified, only torch and exllamav3 faked underneath).

Launch and generated config, readiness, both APIs, streaming with pings, TabbyAPI's error forms,
crashes during load and mid-stream, a hung load, the port+1 trap, auth to the backend, and the
in-place swaps of resident groups (staying in place, keeping the profile's settings, progress).
Each fake model answers "hello world from <folder>", one word per token.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from proxy.backends.tabby import tabby_config
from proxy.config import load_config
from tests.conftest import ProxyProcess, free_port, write_config
from tests.fake_nvml import fake_gpu

Start = Callable[..., ProxyProcess]
GOLDEN = Path(__file__).with_name("golden")
FAST = {"FAKE_TABBY_LOAD_S": "0.2", "FAKE_TABBY_SETTLE_S": "0.05", "FAKE_TABBY_TOKEN_S": "0.01"}
EXL2_REFUSED = "require the exllamav2 backend"  # TabbyAPI's own check refuses the fake-exl2 folder


def tabby_profile(folder: str, **model: Any) -> dict[str, Any]:
    return {"backend": "tabbyapi", "startup_timeout": 60, "model": {"model_name": folder, **model}}


def reply(folder: str) -> str:
    return f"hello world from {folder}"


def backend_card(proxy: ProxyProcess, name: str) -> dict[str, Any]:
    """Return TabbyAPI's own GET /v1/model for a loaded profile (asked at its port, auth off)."""
    port = proxy.status(name)["port"]
    answer = requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=5)
    assert answer.status_code == 200, answer.text
    card: dict[str, Any] = answer.json()
    return card


def sse_events(body: bytes) -> list[Any]:
    events = []
    for line in body.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


@pytest.fixture
def tabby(start_proxy: Start, tabby_testbed: Path) -> Callable[..., ProxyProcess]:
    """Start a proxy whose tabbyapi profiles run the real TabbyAPI test bed."""
    def start(profiles: dict[str, dict[str, Any]], env: dict[str, str] | None = None, **proxy: Any) -> ProxyProcess:
        return start_proxy(profiles, env={**FAST, **(env or {})}, proxy={"tabby_dir": str(tabby_testbed), **proxy})
    return start


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tabby_testbed: Path) -> Iterator[ProxyProcess]:
    """One proxy in front of several real TabbyAPI profiles, shared by the tests that only send requests."""
    profiles = {
        "qwen": {**tabby_profile("fake-alpha"), "aliases": ["qwen:7b"]},
        "pinger": {**tabby_profile("fake-beta"), "network": {"sse_ping_interval": 1}},
        "victim": tabby_profile("fake-gamma"),  # the tests that break their backend use these two
        "crashy": tabby_profile("fake-delta"),
        "broken": tabby_profile("fake-exl2"),
        "nofolder": tabby_profile("not-there"),
    }
    config_path = write_config(tmp_path_factory.mktemp("shared-tabby"), profiles,
                               proxy={"tabby_dir": str(tabby_testbed), "max_loaded_models": 4})
    proxy = ProxyProcess(config_path, free_port(), env=FAST)
    proxy.wait_healthy()
    yield proxy
    proxy.stop()
    assert proxy.kill_leftovers() == [], "backend processes outlived the proxy"


# ---- launch and generated config --------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen-exl3", "with-draft"])
def test_generated_config_matches_the_golden_file(tmp_path: Path, name: str) -> None:
    base = yaml.safe_load((GOLDEN / "tabby-config.yml").read_text())
    profile = yaml.safe_load((GOLDEN / f"{name}.profile.yml").read_text())
    config = load_config(write_config(tmp_path, {name: profile}, tabby=base))
    generated = tabby_config(config.models[name], 5123)
    assert generated == yaml.safe_load((GOLDEN / f"{name}.generated.yml").read_text())


def test_chat_through_both_apis(shared: ProxyProcess) -> None:
    answer = shared.chat("qwen")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "qwen"  # the public name, not the folder TabbyAPI reports
    assert answer.json()["choices"][0]["message"]["content"] == reply("fake-alpha")

    streamed = shared.chat("qwen:7b", stream=True, max_tokens=50)
    assert streamed.status_code == 200 and streamed.content.endswith(b"data: [DONE]\r\n\r\n")
    events = sse_events(streamed.content)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == reply("fake-alpha")
    assert {e["model"] for e in events} == {"qwen"}

    ollama = shared.post("/api/chat", {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
    records = [json.loads(line) for line in ollama.content.splitlines()]
    assert all(record["message"]["role"] == "assistant" for record in records)  # TabbyAPI sends no role
    assert "".join(record["message"]["content"] for record in records) == reply("fake-alpha")
    done = records[-1]
    assert done["done"] is True and done["eval_count"] >= 4 and done["prompt_eval_count"] >= 1

    generated = yaml.safe_load((shared.config_path.parent / "run" / "tabby" / "qwen.yml").read_text())
    assert generated["network"]["disable_auth"] is True and generated["model"]["model_name"] == "fake-alpha"
    assert generated["model"]["inline_model_loading"] is False


def test_streamed_completions_without_max_tokens_work(shared: ProxyProcess) -> None:
    # TabbyAPI's own bug: a streamed completion without max_tokens adds to None and aborts.
    streamed = shared.post("/v1/completions", {"model": "qwen", "prompt": "Once", "stream": True}, stream=True)
    body = streamed.content
    assert streamed.status_code == 200 and b"aborted" not in body and body.endswith(b"data: [DONE]\r\n\r\n")
    events = sse_events(body)
    assert "".join(e["choices"][0]["text"] or "" for e in events) == reply("fake-alpha")

    raw = shared.post("/api/generate", {"model": "qwen", "prompt": "Once", "raw": True})
    assert raw.status_code == 200, raw.text
    records = [json.loads(line) for line in raw.content.splitlines()]
    assert "".join(record["response"] for record in records) == reply("fake-alpha") and records[-1]["done"]


def test_streamed_completion_chunks_carry_the_public_name(shared: ProxyProcess) -> None:
    # TabbyAPI's completion chunks name the folder in `model_name` and have no `model` at all.
    streamed = shared.post("/v1/completions", {"model": "qwen:7b", "prompt": "Once", "stream": True,
                                               "max_tokens": 3}, stream=True)
    events = sse_events(streamed.content)
    assert events and all(event["model"] == "qwen" and event["model_name"] == "qwen" for event in events)
    whole = shared.post("/v1/completions", {"model": "qwen", "prompt": "Once", "max_tokens": 3})
    assert whole.json()["model"] == "qwen" and "fake-alpha" not in whole.text


def test_ollama_tools_without_parameters_reach_tabbyapi(shared: ProxyProcess) -> None:
    # TabbyAPI answers 422 to a function without description or parameters; Ollama accepts both missing.
    answer = shared.post("/api/chat", {"model": "qwen", "stream": False,
                                       "messages": [{"role": "user", "content": "What time is it?"}],
                                       "tools": [{"type": "function", "function": {"name": "now"}}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"]["content"] == reply("fake-alpha")


def test_pings_during_a_long_prefill_pass_through_both_apis(shared: ProxyProcess) -> None:
    content = "[[prefill:2.5]] hi"
    streamed = shared.chat("pinger", content, stream=True)
    assert b": ping" in streamed.content and streamed.content.endswith(b"data: [DONE]\r\n\r\n")
    ollama = shared.post("/api/chat", {"model": "pinger", "messages": [{"role": "user", "content": content}]})
    records = [json.loads(line) for line in ollama.content.splitlines()]
    assert "".join(record["message"]["content"] for record in records) == reply("fake-beta")
    assert records[-1]["done"] is True


def test_tabby_errors_keep_their_status_through_both_apis(shared: ProxyProcess) -> None:
    invalid = shared.post("/v1/chat/completions", {"model": "qwen", "messages": None})
    assert invalid.status_code == 400  # the proxy validates before TabbyAPI's 422 could happen
    refused = shared.chat("qwen", max_tokens=-1)
    assert refused.status_code == 422 and "max_tokens" in refused.text  # TabbyAPI's own answer, relayed
    assert refused.json()["detail"][0]["loc"] == ["body", "max_tokens"]

    # min_tokens above max_tokens: TabbyAPI's unhandled error, a plain-text 500.
    crashed = shared.chat("qwen", stream=True, min_tokens=5000)
    assert crashed.status_code == 500 and crashed.text == "Internal Server Error"
    ollama = shared.post("/api/chat", {"model": "qwen", "stream": False, "options": {"top_k": -5},
                                       "messages": [{"role": "user", "content": "x"}]})
    assert ollama.status_code == 422, ollama.text  # TabbyAPI's validation, rewrapped as Ollama's {"error": "..."}
    assert isinstance(ollama.json()["error"], str) and "top_k" in ollama.json()["error"]


def test_crash_mid_stream_ends_the_stream_with_an_error_and_restarts(shared: ProxyProcess) -> None:
    assert shared.chat("crashy").status_code == 200
    pid = shared.status("crashy")["pid"]
    response = shared.chat("crashy", "[[tokens:400]] hi", stream=True, max_tokens=400)
    chunks = response.iter_content(chunk_size=None)
    first = next(chunks)
    assert b"hello" in first
    os.kill(pid, signal.SIGKILL)
    rest = b"".join(chunks)
    assert b'"backend_failed"' in rest and b"[DONE]" not in rest
    shared.wait_for(lambda: shared.status("crashy")["state"] in ("stopped", "failed"), what="crash noticed")
    again = shared.chat("crashy")
    assert again.status_code == 200 and shared.status("crashy")["pid"] != pid


def test_crash_during_load_fails_fast_with_tabbyapis_reason(shared: ProxyProcess) -> None:
    started = time.monotonic()
    refused = shared.chat("broken")
    assert refused.status_code == 502 and time.monotonic() - started < 30
    message = refused.json()["error"]["message"]
    assert "broken" in message and EXL2_REFUSED in message
    missing = shared.chat("nofolder").json()["error"]["message"]
    assert "nofolder" in missing and "not-there" in missing
    assert shared.status("broken")["state"] == "failed"


def test_hung_load_times_out_and_the_child_is_stopped(tabby: Start) -> None:
    proxy = tabby({"hung": {**tabby_profile("fake-alpha"), "startup_timeout": 2}},
                  env={"FAKE_TABBY_LOAD_S": "120"})
    response = proxy.chat("hung")
    assert response.status_code == 504
    assert "hung" in response.json()["error"]["message"]
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


def test_port_taken_during_load_is_detected_not_trusted(tabby: Start, impostor_factory: Callable[[int], None]) -> None:
    # TabbyAPI checks its port, loads for a while, then binds (or moves to port+1 if the port was
    # taken before its check); a supervisor that trusts "the port answers" talks to the wrong server.
    proxy = tabby({"qwen": tabby_profile("fake-alpha")}, env={"FAKE_TABBY_LOAD_S": "3"})
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: holder.setdefault("r", proxy.chat("qwen")))
    thread.start()
    proxy.wait_for(lambda: proxy.status("qwen")["port"] is not None, timeout_s=10, what="a port")
    impostor_factory(proxy.status("qwen")["port"])
    thread.join(60)
    response = holder["r"]
    assert response.status_code == 502
    assert "someone-else" in response.json()["error"]["message"]
    proxy.wait_for(lambda: proxy.surviving_backends() == [], timeout_s=15, what="the TabbyAPI child stopped")


def test_backend_keys_are_used_and_client_keys_are_not_forwarded(tabby: Start) -> None:
    proxy = tabby({"qwen": tabby_profile("fake-alpha")}, tabby_auth="keys")
    answer = proxy.chat("qwen")
    assert answer.status_code == 200, answer.text  # TabbyAPI refuses anything but its own keys
    generated = yaml.safe_load((proxy.config_path.parent / "run" / "tabby" / "qwen.yml").read_text())
    assert generated["network"]["disable_auth"] is False
    port = proxy.status("qwen")["port"]
    with socket.create_connection(("127.0.0.1", port)) as raw:  # the backend itself still wants a key
        raw.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b" 401 " in raw.recv(200)


# ---- resident groups: in-place swaps -----------------------------------------------------------

def test_resident_group_swaps_stay_in_place(tabby: Start) -> None:
    # TabbyAPI sends its `finished` event before the new model is installed; with work after the
    # last event (FAKE_TABBY_SETTLE_S) a GET /v1/model right after it answers 503.
    proxy = tabby({"first": {**tabby_profile("fake-alpha"), "resident_group": "gpu0"},
                   "second": {**tabby_profile("fake-beta"), "resident_group": "gpu0"}},
                  env={"FAKE_TABBY_SETTLE_S": "0.4"})
    assert proxy.chat("first").json()["choices"][0]["message"]["content"] == reply("fake-alpha")
    pid = proxy.status("first")["pid"]
    for name, folder in [("second", "fake-beta"), ("first", "fake-alpha")] * 3:
        answer = proxy.chat(name)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == reply(folder)
        assert proxy.status(name)["pid"] == pid  # the same process: swapped over the admin API
    log = proxy.log()
    assert log.count("unloaded in place") == 6 and "in-place load failed" not in log
    assert len(proxy.backends()) == 1

    assert proxy.get("/unload", admin=True).json() == {"unloaded": ["first"]}  # not a swap: the process goes
    proxy.wait_for(lambda: proxy.backends() == [], timeout_s=15, what="resident process stopped")


def test_in_place_loads_keep_the_profiles_settings(tabby: Start) -> None:
    # TabbyAPI's load request has no field for max_batch_size (and many more): an in-place load must
    # serve what a fresh process for that profile serves, or the swap restarts the process.
    proxy = tabby({"first": {**tabby_profile("fake-alpha", max_batch_size=7, cache_mode="Q8"), "resident_group": "g"},
                   "second": {**tabby_profile("fake-beta", max_batch_size=7, cache_mode="Q6"), "resident_group": "g"},
                   "third": {**tabby_profile("fake-gamma", max_batch_size=5), "resident_group": "g"}})
    answer = proxy.chat("second")
    assert answer.status_code == 200, answer.text
    fresh = backend_card(proxy, "second")["parameters"]
    assert fresh["max_batch_size"] == 7 and fresh["cache_mode"] == "Q6"
    answer = proxy.chat("first")
    assert answer.status_code == 200, answer.text
    pid = proxy.status("first")["pid"]
    assert backend_card(proxy, "first")["parameters"]["cache_mode"] == "Q8"
    answer = proxy.chat("second")
    assert answer.status_code == 200, answer.text
    assert proxy.status("second")["pid"] == pid
    assert backend_card(proxy, "second")["parameters"] == fresh  # in place, exactly what a fresh process gives

    answer = proxy.chat("third")

    assert answer.status_code == 200, answer.text
    assert proxy.status("third")["pid"] != pid  # max_batch_size differs: a load request cannot carry it
    assert backend_card(proxy, "third")["parameters"]["max_batch_size"] == 5
    assert "cannot change model.max_batch_size" in proxy.log()
    assert len(proxy.backends()) == 1


def test_failed_in_place_load_falls_back_to_a_fresh_process(tabby: Start) -> None:
    proxy = tabby({"first": {**tabby_profile("fake-alpha"), "resident_group": "g"},
                   "old": {**tabby_profile("fake-exl2"), "resident_group": "g"}})
    answer = proxy.chat("first")
    assert answer.status_code == 200, answer.text
    old_pid = proxy.status("first")["pid"]
    answer = proxy.chat("old")
    assert answer.status_code == 502  # the fresh process refuses it too: TabbyAPI's reason reaches the client
    assert EXL2_REFUSED in answer.json()["error"]["message"]
    assert "in-place load failed" in proxy.log()
    again = proxy.chat("first")
    assert again.status_code == 200 and proxy.status("first")["pid"] != old_pid
    assert len(proxy.backends()) == 1


def test_an_in_place_unload_that_keeps_its_vram_restarts_the_process(tabby: Start, tmp_path: Path) -> None:
    # NVML is the boundary: the fake GPU says what TabbyAPI's process holds. Once TabbyAPI has
    # unloaded, the memory comes back in the first swap and stays taken (a leak) in the second.
    gpus = tmp_path / "gpus"
    fake_gpu.setup(gpus, [24 * 1024 ** 3])
    env = {"FAKE_NVML_DIR": str(gpus), "PYTHONPATH": str(Path(__file__).with_name("fake_nvml"))}
    proxy = tabby({"first": {**tabby_profile("fake-alpha"), "resident_group": "g"},
                   "second": {**tabby_profile("fake-beta"), "resident_group": "g"}}, env=env)
    assert proxy.chat("first").status_code == 200
    pid, port = proxy.status("first")["pid"], proxy.status("first")["port"]
    fake_gpu.register(pid, {0: 10 * 1024 ** 3}, directory=gpus)

    def free_once_unloaded() -> None:  # TabbyAPI answers no model while it is empty
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).status_code != 200:
                fake_gpu.unregister(pid, directory=gpus)
                return
            time.sleep(0.02)

    freer = threading.Thread(target=free_once_unloaded)
    freer.start()
    assert proxy.chat("second").status_code == 200
    freer.join(30)
    assert proxy.status("second")["pid"] == pid and "unloaded in place" in proxy.log()

    fake_gpu.register(pid, {0: 10 * 1024 ** 3}, directory=gpus)  # this time it is never given back
    answer = proxy.chat("first")
    assert answer.status_code == 200, answer.text
    assert f"pid {pid} still holds 10 GiB of VRAM 5s after unloading in place" in proxy.log()
    assert proxy.status("first")["pid"] != pid and len(proxy.backends()) == 1


def test_in_place_load_progress_shows_in_status(tabby: Start) -> None:
    proxy = tabby({"first": {**tabby_profile("fake-alpha"), "resident_group": "g"},
                   "second": {**tabby_profile("fake-beta"), "resident_group": "g"}},
                  env={"FAKE_TABBY_LOAD_S": "2"})
    answer = proxy.chat("first")
    assert answer.status_code == 200, answer.text
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: holder.setdefault("r", proxy.chat("second")))
    thread.start()
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        progress = proxy.status("second")["progress"]
        if progress:
            seen.append(progress)
        time.sleep(0.05)
    thread.join(30)
    assert holder["r"].status_code == 200
    assert seen and seen[0].startswith("loading") and any(entry.endswith("/8") for entry in seen)
    assert proxy.status("second")["progress"] is None
    assert proxy.status("second")["pid"] == proxy.status("first")["pid"] or proxy.status("first")["pid"] is None


# ---- the newer dialects on TabbyAPI ---------------------------------------------------------------

def test_anthropic_messages_and_openai_responses_through_tabbyapi(shared: ProxyProcess) -> None:
    import anthropic
    import openai

    from tests.conftest import API_KEY

    claude = anthropic.Anthropic(base_url=shared.url, api_key=API_KEY, max_retries=0, timeout=60)
    message = claude.messages.create(model="qwen", max_tokens=32000, messages=[{"role": "user", "content": "hi"}],
                                     tools=[{"name": "now", "input_schema": {"type": "object"}}])
    assert message.model == "qwen" and message.stop_reason == "end_turn"
    assert message.content[0].text == reply("fake-alpha")  # type: ignore[union-attr]
    with claude.messages.stream(model="qwen", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as stream:
        assert "".join(stream.text_stream) == reply("fake-alpha")
    assert claude.messages.count_tokens(model="qwen", messages=[{"role": "user", "content": "hi"}]).input_tokens > 0

    client = openai.OpenAI(base_url=shared.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    response = client.responses.create(model="qwen", input="hi", max_output_tokens=64)
    assert response.output_text == reply("fake-alpha") and response.model == "qwen"
    events = [event.type for event in client.responses.create(model="qwen", input="hi", stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert shared.status("qwen")["leases"] == 0
