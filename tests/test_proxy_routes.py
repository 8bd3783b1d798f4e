"""The real proxy.py process in front of tests/fake_backend.py (the `command` kind): routes, auth,
errors, template merging, streaming relay and backend failure modes the real server cannot show.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import API_KEY, FAKE_BACKEND, ROOT, ProxyProcess, fake_profile, llamacpp_profile, write_config

Start = Callable[..., ProxyProcess]


@pytest.fixture
def proxy(start_proxy: Start) -> ProxyProcess:
    return start_proxy({
        "fake": fake_profile(
            "--token-delay", "0.05", default=True, aliases=["fake-alias"], unload_timer=30,
            template={"system": "Be brief.", "system_time": True, "temperature": 0.3, "max_tokens": 3, "top_k": 7},
        ),
        "renamed": {"backend": "command", "command": {
            "cmd": ["${PYTHON}", str(FAKE_BACKEND), "--port", "${PORT}", "--model", "upstream-id"],
            "model_id": "upstream-id"}},
    })


def test_open_routes_need_no_key_and_others_do(proxy: ProxyProcess) -> None:
    plain = proxy.http
    assert plain.get(proxy.url + "/health").json() == {"status": "ok"}
    assert plain.get(proxy.url + "/ping").status_code == 200
    assert plain.get(proxy.url + "/status").status_code == 401  # pids and errors need a key
    assert proxy.get("/status").status_code == 200
    for path in ("/v1/models",):
        response = plain.get(proxy.url + path)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    bad = plain.post(proxy.url + "/v1/chat/completions", json={"messages": []},
                     headers={"Authorization": "Bearer wrong-key-123456"})
    assert bad.status_code == 401 and "invalid API key" in bad.json()["error"]["message"]
    spoofed = plain.get(proxy.url + "/v1/models", headers={"Host": "localhost"})
    assert spoofed.status_code == 401  # the Host header never decides
    assert plain.get(proxy.url + "/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    assert proxy.backends() == []  # nothing was started for refused requests


def test_models_list_shows_every_profile_and_its_state(proxy: ProxyProcess) -> None:
    listing = proxy.get("/v1/models").json()
    assert listing["object"] == "list"
    assert {card["id"]: card["state"] for card in listing["data"]} == {"fake": "stopped", "renamed": "stopped"}
    assert proxy.chat("fake").status_code == 200
    card = proxy.get("/v1/models/fake-alias").json()
    assert card["id"] == "fake" and card["loaded"] is True and card["aliases"] == ["fake-alias"]


def test_template_defaults_and_keep_alive_are_merged_before_forwarding(proxy: ProxyProcess) -> None:
    response = proxy.post("/v1/chat/completions", {
        "model": "fake-alias:latest", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.9, "keep_alive": "5m", "options": {"keep_alive": 3}, "ttl": 4,
    })
    assert response.status_code == 200, response.text
    echo = response.json()["echo"]
    assert echo["model"] == "fake"
    assert echo["temperature"] == 0.9  # the request's own value wins
    assert echo["max_tokens"] == 3 and echo["top_k"] == 7  # defaults fill the rest
    assert "keep_alive" not in echo and "ttl" not in echo and echo.get("options") == {}
    system = echo["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.")
    assert "Current date and time:" in system["content"]
    assert echo["messages"][1] == {"role": "user", "content": "hi"}

    own_system = proxy.post("/v1/chat/completions", {"messages": [
        {"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "hi"}]})
    messages = own_system.json()["echo"]["messages"]
    assert len(messages) == 2 and messages[0]["content"].startswith("Talk like a pirate.")


def test_no_model_uses_the_default_profile(proxy: ProxyProcess) -> None:
    response = proxy.post("/v1/completions", {"prompt": "x"})
    assert response.status_code == 200
    assert response.json()["echo"]["model"] == "fake" and response.json()["echo"]["max_tokens"] == 3


def test_backend_model_id_is_renamed_to_the_public_name(proxy: ProxyProcess) -> None:
    response = proxy.chat("renamed")
    assert response.status_code == 200
    assert response.json()["echo"]["model"] == "upstream-id"
    assert response.json()["model"] == "renamed"
    streamed = proxy.chat("renamed", stream=True)
    chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith(b"data: {")]
    assert chunks and {chunk["model"] for chunk in chunks} == {"renamed"}
    text = "".join((chunk["choices"][0].get("delta") or {}).get("content") or "" for chunk in chunks if chunk["choices"])
    assert text == "tok0 tok1 tok2 tok3 tok4 "  # the content passes untouched


@pytest.mark.parametrize(("body", "status", "needle"), [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({"model": "nope", "messages": []}, 404, "configured models: fake, fake-alias, renamed"),
    ({"model": "../../etc/passwd", "messages": []}, 404, "not found"),
    ({"model": "a" * 300, "messages": []}, 400, "model"),
    ({"model": "bad\u0000name", "messages": []}, 400, "model"),
    ({"model": 42, "messages": []}, 400, "model: expected a string"),
    ({"model": "fake"}, 400, "messages: required"),
    ({"model": "fake", "messages": "hi"}, 400, "messages"),
    ({"model": "fake", "messages": [], "keep_alive": "soon"}, 400, "keep_alive"),
    ({"model": "fake", "messages": [], "keep_alive": "300"}, 400, "keep_alive"),
    ({"model": "fake", "messages": [], "options": {"keep_alive": True}}, 400, "options.keep_alive"),
    ({"model": "fake", "messages": [], "stream": "yes"}, 400, "stream"),
])
def test_bad_input_is_a_clear_4xx_and_starts_nothing(proxy: ProxyProcess, body: Any, status: int,
                                                     needle: str) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    response = proxy.http.post(proxy.url + "/v1/chat/completions", data=data,
                               headers={**proxy.headers(), "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "code", "param"}
    assert proxy.backends() == []


def test_unknown_route_and_method_answer_json(proxy: ProxyProcess) -> None:
    missing = proxy.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = proxy.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_upstream_error_status_and_body_are_kept(proxy: ProxyProcess) -> None:
    for status in (400, 422, 500):
        response = proxy.chat("fake", fake_status=status)
        assert response.status_code == status
        assert response.json()["error"]["message"] == f"fake error {status}"
    streamed = proxy.chat("fake", fake_status=400, stream=True)
    assert streamed.status_code == 400 and streamed.json()["error"]["message"] == "fake error 400"


def test_stream_chunks_leave_the_proxy_as_they_arrive(start_proxy: Start) -> None:
    proxy = start_proxy({"slow": fake_profile("--token-delay", "0.25", "--tokens", "4")})
    assert proxy.chat("slow").status_code == 200  # load first: time only the stream
    started = time.monotonic()
    response = proxy.chat("slow", stream=True)
    arrivals = []
    for line in response.iter_lines():
        if line.startswith(b"data: ") and b'"content":"tok' in line:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    assert arrivals[0] < 0.2  # the first token is not held back
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert all(0.15 < gap < 0.5 for gap in gaps), gaps  # each chunk is relayed when it is produced


def test_in_stream_backend_error_reaches_the_client(start_proxy: Start) -> None:
    proxy = start_proxy({"flaky": fake_profile("--error-after", "2")})
    response = proxy.chat("flaky", stream=True)
    events = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert b'"error"' in events[-1] and b"[DONE]" not in events[-1]
    assert proxy.status("flaky")["leases"] == 0


def test_backend_exit_during_start_is_a_502_with_its_output_for_admins(start_proxy: Start) -> None:
    proxy = start_proxy({"dies": fake_profile("--exit-during-startup", "--startup-delay", "0.2")})
    response = proxy.chat("dies")
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "dies" in message and "code 3" in message and "fatal: simulated start failure" in message  # the reason
    assert "fake_backend.py" not in message  # never the command line
    admin_view = proxy.get("/status", admin=True).json()["models"][0]
    assert "simulated start failure" in admin_view["last_output"]
    assert "simulated start failure" in proxy.log()


def test_backend_not_ready_in_time_is_a_504_and_the_child_is_stopped(start_proxy: Start) -> None:
    proxy = start_proxy({"slow-start": fake_profile("--startup-delay", "30", startup_timeout=1)})
    started = time.monotonic()
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: holder.setdefault("r", proxy.chat("slow-start")))
    thread.start()
    time.sleep(0.4)
    proxy.backends()  # remember the child, to check the process table afterwards
    thread.join(15)
    response = holder["r"]
    assert response.status_code == 504 and 1 <= time.monotonic() - started < 8
    assert "startup_timeout" in response.json()["error"]["message"]
    assert proxy.surviving_backends() == []


def test_queue_timeout_is_a_503_with_retry_after(start_proxy: Start) -> None:
    proxy = start_proxy({"one": fake_profile("--token-delay", "0.5", "--tokens", "6"), "two": fake_profile()},
                        proxy={"queue_timeout": 1})
    stream = proxy.chat("one", stream=True)
    lines = stream.iter_lines()
    next(lines)
    started = time.monotonic()
    busy = proxy.chat("two")
    assert busy.status_code == 503 and busy.headers["Retry-After"]
    assert busy.json()["error"]["code"] == "model_busy"
    assert 0.9 < time.monotonic() - started < 3
    assert b"[DONE]" in b"".join(lines)  # the running stream was never touched


def test_backend_ignoring_sigterm_is_killed_after_the_grace_period(start_proxy: Start) -> None:
    proxy = start_proxy({"stubborn": fake_profile("--ignore-sigterm")}, proxy={"stop_grace": 1})
    assert proxy.chat("stubborn").status_code == 200
    [backend] = proxy.backends()
    started = time.monotonic()
    assert proxy.get("/unload", admin=True).json() == {"unloaded": ["stubborn"]}
    assert 0.9 < time.monotonic() - started < 5
    assert proxy.surviving_backends() == []
    assert not backend.is_running() or backend.status() == "zombie"


def test_force_unload_cuts_a_running_stream(start_proxy: Start) -> None:
    proxy = start_proxy({"long": fake_profile("--token-delay", "0.3", "--tokens", "20")})
    stream = proxy.chat("long", stream=True)
    lines = stream.iter_lines()
    next(lines)
    response = proxy.get("/unload?force=true", admin=True)
    assert response.json() == {"unloaded": ["long"]}
    rest = b"\n".join(lines)
    assert b"[DONE]" not in rest and b'"error"' in rest
    assert proxy.status("long")["state"] == "stopped"
    bad = proxy.get("/unload?force=maybe", admin=True)
    assert bad.status_code == 400 and "force" in bad.json()["error"]["message"]


def test_status_reports_every_model(proxy: ProxyProcess) -> None:
    assert proxy.chat("fake", keep_alive="10s").status_code == 200
    status = proxy.get("/status").json()
    assert status["version"] and status["uptime_s"] >= 0 and status["max_loaded_models"] == 1
    fake = next(model for model in status["models"] if model["name"] == "fake")
    assert fake["state"] == "ready" and fake["pid"] and fake["port"] and fake["leases"] == 0
    assert fake["keep_alive_s"] == 10 and fake["expires_at"] and fake["requests_served"] == 1
    assert requests.get(f"http://127.0.0.1:{fake['port']}/pid", timeout=5).json()["pid"] == fake["pid"]


def test_a_client_that_leaves_the_queue_loads_nothing(start_proxy: Start) -> None:
    proxy = start_proxy({"one": fake_profile("--token-delay", "0.3", "--tokens", "8"), "two": fake_profile()})
    stream = proxy.chat("one", stream=True)
    lines = stream.iter_lines()
    next(lines)
    with pytest.raises(requests.Timeout):  # the client gives up and closes its connection
        requests.post(proxy.url + "/v1/chat/completions", headers=proxy.headers(), timeout=0.5,
                      json={"model": "two", "messages": [{"role": "user", "content": "hi"}]})
    proxy.wait_for(lambda: proxy.status("two")["queued"] == 0, timeout_s=3, what="queue cleanup")
    assert b"[DONE]" in b"".join(lines)
    assert proxy.chat("one").status_code == 200
    assert "model two: stopped -> starting" not in proxy.log()  # no swap for a client that left
    assert "499" in proxy.log()


EMBED_REQUESTS = [("/v1/embeddings", {"input": "hello"}), ("/api/embed", {"input": "hello"}),
                  ("/api/embeddings", {"prompt": "hello"})]


@pytest.mark.parametrize(("path", "body"), EMBED_REQUESTS)
def test_embeddings_on_a_profile_that_cannot_embed_are_a_400_that_loads_nothing(
        start_proxy: Start, gguf: Path, path: str, body: dict[str, Any]) -> None:
    proxy = start_proxy({
        "chatty": llamacpp_profile(gguf),                            # llamacpp.embedding left false
        "declared": fake_profile(capabilities=["completion", "tools"]),
        "command": fake_profile(),                                   # may embed: nothing declared
    })
    for model, key in (("chatty", "set llamacpp.embedding: true in model_configs/chatty.yml"),
                       ("declared", "add it to capabilities in model_configs/declared.yml")):
        refused = proxy.post(path, {"model": model, **body})
        assert refused.status_code == 400, refused.text
        if path.startswith("/v1/"):  # each route answers in its own dialect's shape
            error = refused.json()["error"]
            assert error["code"] == "invalid_request" and error["param"] == "model"
            message = error["message"]
        else:
            assert set(refused.json()) == {"error"}
            message = refused.json()["error"]
        assert message.startswith(f'"{model}" does not support embeddings') and key in message, message
    assert proxy.backends() == []  # refused before any lease: nothing was loaded
    assert {proxy.status(name)["state"] for name in ("chatty", "declared")} == {"stopped"}

    passed = proxy.post(path, {"model": "command", **body})  # a command profile without capabilities is asked
    assert passed.status_code == 200, passed.text


def test_unload_reads_a_json_body_whatever_its_content_type(start_proxy: Start) -> None:
    proxy = start_proxy({"long": fake_profile("--token-delay", "0.3", "--tokens", "40"), "other": fake_profile()},
                        proxy={"max_loaded_models": 2})
    assert proxy.chat("other").status_code == 200
    stream = proxy.chat("long", stream=True)
    lines = stream.iter_lines()
    next(lines)

    def unload(body: bytes, content_type: str | None) -> requests.Response:
        headers = proxy.headers(admin=True) | ({"Content-Type": content_type} if content_type else {})
        return proxy.http.post(proxy.url + "/unload", data=body, headers=headers, timeout=60)

    # curl -d sends application/x-www-form-urlencoded: still one model, still forced
    started = time.monotonic()
    forced = unload(b'{"model": "long", "force": true}', "application/x-www-form-urlencoded")
    assert forced.status_code == 200 and forced.json() == {"unloaded": ["long"]}, forced.text
    assert time.monotonic() - started < 6  # forced: it did not wait for the 12 s stream
    rest = b"\n".join(lines)
    assert b"[DONE]" not in rest and b'"error"' in rest
    assert proxy.status("other")["state"] == "ready"

    for bad in (b'{"model": "other"', b"model=other", b'["other"]'):
        refused = unload(bad, "application/x-www-form-urlencoded")
        assert refused.status_code == 400, refused.text
        assert "JSON object" in refused.json()["error"]["message"]
    assert proxy.status("other")["state"] == "ready"  # a body it cannot read never means "all models"

    assert unload(b'{"model": "other"}', None).json() == {"unloaded": ["other"]}  # no Content-Type at all


def test_force_unload_does_not_wait_out_stop_grace_for_a_backend_ignoring_sigterm(start_proxy: Start) -> None:
    # llama.cpp ignores SIGTERM while it generates; "force" promises the client an unload at once.
    proxy = start_proxy({"stubborn": fake_profile("--ignore-sigterm", "--token-delay", "0.3", "--tokens", "60")},
                        proxy={"stop_grace": 10})
    stream = proxy.chat("stubborn", stream=True)
    lines = stream.iter_lines()
    next(lines)
    [backend] = proxy.backends()
    started = time.monotonic()
    response = proxy.get("/unload?force=true", admin=True)
    elapsed = time.monotonic() - started
    assert response.json() == {"unloaded": ["stubborn"]}
    assert elapsed < 6, f"a forced unload took {elapsed:.1f}s (stop_grace is 10 s)"
    assert b"[DONE]" not in b"\n".join(lines)
    assert not backend.is_running() or backend.status() == "zombie"
    assert "ignored SIGTERM for 1s; sending SIGKILL" in proxy.log()


@pytest.mark.parametrize("port", ["0", "65536", "70000", "-1", "abc", "9000.5"])
def test_a_port_out_of_range_is_a_one_line_error_with_status_2(tmp_path: Path, port: str) -> None:
    config_path = write_config(tmp_path, {"fake": fake_profile()})
    done = subprocess.run([sys.executable, str(ROOT / "proxy.py"), "--config", str(config_path), "--port", port],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --port: expected a TCP port 1-65535, got {port!r}"  # one line


def test_the_startup_log_names_the_models_the_default_and_the_key_file(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile(default=True, aliases=["f", "fk"]), "other": fake_profile()})
    log = proxy.log()
    assert "INFO proxy: models: fake (aliases f, fk), other; default: fake" in log
    assert f"keys in {proxy.config_path.parent / 'api_tokens.yml'}" in log
