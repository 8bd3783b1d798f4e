"""proxy.loopback_without_key through the real proxy.py: off by default; on, a keyless request from
loopback passes as the plain api_key (bodies included, past the early check in proxy/server.py),
while a wrong key, an admin route and any other peer address still need a key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.app import create_app
from proxy.auth import LOOPBACK_KEY, Keys, KeyEntry, is_loopback, keyless_entry
from proxy.config import load_config
from proxy.errors import Forbidden, Unauthorized
from proxy.manager import ModelManager
from tests.conftest import ProxyProcess, fake_profile, write_config
from tests.test_manager import FakeLauncher

Start = Callable[..., ProxyProcess]
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
OLLAMA_CHAT = {"model": "fake", "messages": [{"role": "user", "content": "Say hello."}], "stream": False}


def keyless(proxy: ProxyProcess, method: str, path: str, body: Any = None, *, base: str | None = None,
            headers: dict[str, str] | None = None) -> requests.Response:
    return proxy.http.request(method, (base or proxy.url) + path, json=body, headers=headers, timeout=30)


def test_off_by_default_a_keyless_request_gets_401(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    assert keyless(proxy, "GET", "/v1/models").status_code == 401
    assert keyless(proxy, "POST", "/v1/chat/completions", CHAT).status_code == 401  # refused before its body
    assert keyless(proxy, "POST", "/api/chat", OLLAMA_CHAT).status_code == 401


def test_on_keyless_loopback_requests_pass_as_the_plain_key(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()}, proxy={"loopback_without_key": True})
    assert keyless(proxy, "GET", "/v1/models").status_code == 200
    chat = keyless(proxy, "POST", "/v1/chat/completions", CHAT)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    ollama = keyless(proxy, "POST", "/api/chat", OLLAMA_CHAT)
    assert ollama.status_code == 200, ollama.text
    assert ollama.json()["done"] is True
    assert "key=(loopback)" in proxy.log()  # its own name in the access log, and its own admission bucket

    wrong = {"Authorization": "Bearer not-a-key-at-all"}
    assert keyless(proxy, "GET", "/v1/models", headers=wrong).status_code == 401
    assert keyless(proxy, "POST", "/v1/chat/completions", CHAT, headers=wrong).status_code == 401
    assert keyless(proxy, "GET", "/api/version", headers=wrong).status_code == 401

    assert keyless(proxy, "POST", "/unload", {}).status_code in (401, 403)  # admin routes need the admin key
    assert keyless(proxy, "POST", "/models/unload", {"model": "fake"}).status_code in (401, 403)
    status = keyless(proxy, "GET", "/status")
    assert status.status_code == 200
    assert all(model["last_output"] is None for model in status.json()["models"])  # what non-admin keys see


def test_on_other_peers_still_need_a_key(tmp_path: Path) -> None:
    # In-process (create_app's seams), so no traffic leaves loopback: the app sees each peer address
    # as waitress would give it (REMOTE_ADDR), and forwarding headers change nothing.
    config = load_config(write_config(tmp_path, {"fake": fake_profile()}, proxy={"loopback_without_key": True}))
    manager = ModelManager(config, FakeLauncher())
    try:
        client = create_app(config, manager).test_client()
        forged = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Forwarded": "for=127.0.0.1"}
        for peer in ("192.0.2.2", "10.0.0.1", "::ffff:192.0.2.2", "fe80::1"):
            environ = {"REMOTE_ADDR": peer}
            assert client.get("/v1/models", environ_base=environ).status_code == 401
            assert client.get("/v1/models", environ_base=environ, headers=forged).status_code == 401
            assert client.post("/api/chat", json=OLLAMA_CHAT, environ_base=environ).status_code == 401
        assert client.get("/v1/models", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 200
        assert client.get("/v1/models", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    finally:
        manager.shutdown()


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("192.0.2.2", False), ("10.0.0.1", False), ("::ffff:192.0.2.2", False), ("fe80::1", False),
    ("0.0.0.0", False), ("localhost", False), ("", False), (None, False),
])
def test_the_loopback_check(address: str | None, loopback: bool) -> None:
    assert is_loopback(address) is loopback
    assert keyless_entry(True, address) is (LOOPBACK_KEY if loopback else None)
    assert keyless_entry(False, address) is None


def test_keys_check_with_a_keyless_entry() -> None:
    keys = Keys((KeyEntry("api_key", "plain-key-123"), KeyEntry("admin_key", "admin-key-123", admin=True)))
    assert keys.check({}, keyless=LOOPBACK_KEY) is LOOPBACK_KEY
    with pytest.raises(Unauthorized):
        keys.check({})
    with pytest.raises(Unauthorized):
        keys.check({"x-api-key": "wrong-key-123"}, keyless=LOOPBACK_KEY)
    with pytest.raises(Forbidden):
        keys.check({}, admin=True, keyless=LOOPBACK_KEY)
    found = keys.check({"x-api-key": "admin-key-123"}, admin=True, keyless=LOOPBACK_KEY)
    assert found is not None and found.admin
