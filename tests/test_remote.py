"""`backend: remote`: profiles served by OpenAI-compatible servers the proxy does not start.

The servers are tests/fake_backend.py (with --api-key) and llama.cpp's own server, started here as
plain processes on loopback; the proxy is the real proxy.py. Every dialect goes through them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from proxy.config import ConfigError, load_config
from tests.conftest import FAKE_BACKEND, ROOT, ProxyProcess, fake_profile, free_port, wait_until, write_config

REMOTE_KEY = "remote-secret-key-31337"


class Server:
    """A server on "another machine": started here, by PID, and stopped by PID."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = log.open("ab")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_up(self, timeout_s: float = 30.0) -> Server:
        def up() -> bool:
            assert self.popen.poll() is None, f"the server exited with {self.popen.returncode}"
            try:
                return requests.get(self.url + "/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False
        wait_until(up, timeout_s, f"the server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._log.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(model: str, *flags: str, port: int | None = None) -> Server:
        port = port or free_port()
        server = Server([sys.executable, str(FAKE_BACKEND), "--port", str(port), "--model", model, *flags], port,
                        tmp_path / f"server-{port}.log")
        started.append(server)
        return server.wait_up()

    yield start
    for server in started:
        server.stop()


def remote(url: str, **settings: object) -> dict[str, object]:
    return {"backend": "remote", "remote": {"url": url, **settings}}


def messages(proxy: ProxyProcess, model: str, **fields: object) -> requests.Response:
    return proxy.post("/v1/messages", {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                                       **fields}, stream=bool(fields.get("stream")))


def test_a_remote_profile_serves_every_dialect_takes_no_slot_and_is_checked_again_when_gone(
        start_proxy: Callable[..., ProxyProcess], servers: Callable[..., Server]) -> None:
    far = servers("upstream-far", "--api-key", REMOTE_KEY)
    later_port = free_port()
    proxy = start_proxy({
        "local": fake_profile(),
        "far": remote(far.url + "/v1/", api_key=REMOTE_KEY, model_id="upstream-far", timeout=2),
        "badkey": remote(far.url, api_key="not-the-key"),
        "later": remote(f"http://127.0.0.1:{later_port}", api_key_env="LATER_KEY", timeout=2),
    }, env={"LATER_KEY": REMOTE_KEY}, proxy={"max_loaded_models": 1})

    # The local model takes the one slot; the remote ones never evict it.
    assert proxy.chat("local").status_code == 200
    local_pid = proxy.status("local")["pid"]

    answer = proxy.chat("far")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "far"  # the remote's own id is renamed to the public name
    assert answer.json()["echo"]["model"] == "upstream-far"
    with proxy.chat("far", stream=True) as stream:
        body = stream.content
    assert b"tok0" in body and b'"model":"far"' in body and body.rstrip().endswith(b"data: [DONE]")
    ollama = proxy.post("/api/chat", {"model": "far", "messages": [{"role": "user", "content": "hi"}]})
    lines = [json.loads(line) for line in ollama.text.splitlines()]
    assert lines[-1]["done"] is True and "".join(line["message"]["content"] for line in lines).startswith("tok0")
    anthropic = messages(proxy, "far")
    assert anthropic.status_code == 200 and anthropic.json()["content"][0]["text"].startswith("tok0")
    with messages(proxy, "far", stream=True) as events:
        assert b"event: message_stop" in events.content

    status = proxy.status("far")
    assert status["state"] == "ready" and status["pid"] is None and status["url"] == far.url
    assert proxy.status("local")["state"] == "ready" and proxy.status("local")["pid"] == local_pid
    assert len(proxy.backends()) == 1  # only the local model's process: nothing was spawned for the remotes

    refused = proxy.chat("badkey")
    assert refused.status_code == 502
    assert refused.json()["error"]["message"] == (f"badkey: the remote server at {far.url} refused the proxy's key "
                                                  "(HTTP 401)")

    # Down at the first request, up at the second.
    down = proxy.chat("later")
    assert down.status_code == 502
    assert down.json()["error"]["message"].startswith(
        f"later: the remote server at http://127.0.0.1:{later_port} is unreachable: connection refused")
    assert proxy.status("later")["state"] == "failed"
    later = servers("later", "--api-key", REMOTE_KEY, port=later_port)
    assert proxy.chat("later").status_code == 200

    # Gone while ready: that request gets the 502, the next one checks the server again.
    later.stop()
    lost = proxy.chat("later")
    assert lost.status_code == 502 and "later:" in lost.json()["error"]["message"]
    status = proxy.status("later")
    assert status["state"] == "stopped" and "unreachable" in status["last_error"], status
    assert "exited" not in status["last_error"]
    later = servers("later", "--api-key", REMOTE_KEY, port=later_port)
    assert proxy.chat("later").status_code == 200

    # Its key changed meanwhile: a 502 that says the proxy's key was refused, never the server's own 401.
    later.stop()
    servers("later", "--api-key", "rotated-elsewhere", port=later_port)
    rotated = proxy.chat("later")
    assert rotated.status_code == 502
    assert rotated.json()["error"]["message"] == (f"later: the remote server at http://127.0.0.1:{later_port} "
                                                  "refused the proxy's key (HTTP 401)")
    assert proxy.status("later")["state"] == "stopped"

    assert proxy.status("local")["pid"] == local_pid
    assert REMOTE_KEY not in proxy.log() and "not-the-key" not in proxy.log()


def test_a_remote_llamacpp_server_answers_through_the_openai_ollama_and_anthropic_routes(
        start_proxy: Callable[..., ProxyProcess], gguf: Path, tmp_path: Path) -> None:
    port = free_port()
    server = Server([sys.executable, str(ROOT / "proxy" / "backends" / "llamacpp_server.py"), "--model-path", str(gguf),
                     "--port", str(port), "--alias", "SmolLM2", "--n-ctx", "1024", "--threads", "2"], port,
                    tmp_path / "llamacpp.log")
    try:
        server.wait_up(60)
        proxy = start_proxy({"smol": remote(server.url, model_id="SmolLM2")})
        chat = proxy.chat("smol")
        assert chat.status_code == 200, chat.text
        assert chat.json()["model"] == "smol" and chat.json()["choices"][0]["message"]["content"]
        generated = proxy.post("/api/generate", {"model": "smol", "prompt": "Hello", "stream": False,
                                                 "options": {"num_predict": 4, "temperature": 0}})
        assert generated.status_code == 200 and generated.json()["done"] is True
        assert generated.json()["eval_count"] >= 1
        message = messages(proxy, "smol")
        assert message.status_code == 200 and message.json()["stop_reason"] in ("end_turn", "max_tokens")
    finally:
        server.stop()


@pytest.mark.parametrize("remote_section, problem", [
    pytest.param({}, "remote.url: required", id="no-url"),
    pytest.param({"url": "ftp://box/models"}, "expected an http:// or https:// URL with a host", id="not-http"),
    pytest.param({"url": "http://user:pw@box:8080", "api_key": "k"}, "a key is set too", id="two-credentials"),
    pytest.param({"url": "http://box:8080", "api_key": "k", "api_key_env": "K"}, "not both", id="key-and-env"),
    pytest.param({"url": "http://box:8080", "api_key_env": "PROXY_TEST_UNSET_VARIABLE"},
                 "the environment variable PROXY_TEST_UNSET_VARIABLE is not set", id="unset-variable"),
    pytest.param({"url": "http://box:8080", "colour": 1}, "remote.colour: unknown key", id="unknown-key"),
    pytest.param({"url": "http://box:8080", "api_key": 918273645}, "remote.api_key: expected a string (quote it",
                 id="a-key-that-is-not-a-string-is-never-shown"),
])
def test_remote_settings_are_checked_when_the_config_is_read(
        tmp_path: Path, remote_section: dict[str, object], problem: str) -> None:
    path = write_config(tmp_path, {"far": {"backend": "remote", "remote": remote_section}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert problem in str(caught.value)
    assert "pw" not in str(caught.value) and "918273645" not in str(caught.value)


def test_a_remote_url_loses_its_credentials_and_v1_and_keeps_its_prefix(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"far": remote("https://alice:s%40cret@api.example.org:8443/openai/v1/")})
    settings = load_config(path).models["far"].remote
    assert settings is not None
    assert settings.endpoint.url == "https://api.example.org:8443/openai"
    assert settings.endpoint.headers == {"Authorization": "Basic YWxpY2U6c0BjcmV0"}  # alice:s@cret
    assert "cret" not in repr(settings)
