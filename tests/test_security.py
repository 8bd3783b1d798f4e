"""Gateway hardening through the real proxy.py: keys and the key CLI, rate limits, body limits, CORS,
overload, graceful shutdown, and that keys and prompts never reach the log.
"""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import yaml

from tests.conftest import ADMIN_KEY, API_KEY, ROOT, ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]


def keys_cli(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "proxy.py"), "--config", str(proxy.config_path), "keys", *args],
                          capture_output=True, text=True, timeout=30)


def test_named_keys_admin_flag_and_the_key_cli(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    added = keys_cli(proxy, "add", "alice")
    assert added.returncode == 0, added.stderr
    alice = added.stdout.strip()
    tokens = proxy.config_path.parent / "api_tokens.yml"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert yaml.safe_load(tokens.read_text())["admin_key"] == ADMIN_KEY  # the rest of the file is kept

    def works(key: str, path: str = "/v1/models") -> int:
        return proxy.http.get(proxy.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code

    proxy.wait_for(lambda: works(alice) == 200, timeout_s=6, what="the running proxy to pick up the new key")
    assert works(alice, "/unload") == 403  # an API key on an admin route: forbidden, not unauthorized
    listing = keys_cli(proxy, "list").stdout
    assert "alice" in listing and alice not in listing and API_KEY not in listing

    boss = keys_cli(proxy, "add", "boss", "--admin").stdout.strip()
    proxy.wait_for(lambda: works(boss, "/unload") == 200, timeout_s=6, what="the admin key")

    rotated = keys_cli(proxy, "rotate", "alice").stdout.strip()
    proxy.wait_for(lambda: works(rotated) == 200 and works(alice) == 401, timeout_s=6, what="the rotation")
    assert keys_cli(proxy, "remove", "alice").returncode == 0
    proxy.wait_for(lambda: works(rotated) == 401, timeout_s=6, what="the removal")
    assert keys_cli(proxy, "remove", "nobody").returncode == 2
    assert keys_cli(proxy, "add", "bad name!").returncode == 2
    for secret in (alice, rotated, boss, API_KEY, ADMIN_KEY):
        assert secret not in proxy.log()  # keys never reach the log


def test_rate_limit_answers_429_in_each_dialect(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    tokens = proxy.config_path.parent / "api_tokens.yml"
    raw = yaml.safe_load(tokens.read_text())
    raw["keys"] = [{"name": "slow", "key": "slow-key-00000000", "rate_limit": "3/min"}]
    tokens.write_text(yaml.safe_dump(raw))
    headers = {"Authorization": "Bearer slow-key-00000000"}
    proxy.wait_for(lambda: proxy.http.get(proxy.url + "/api/tags", headers=headers).status_code == 200,
                   timeout_s=6, what="the new key")
    statuses = [proxy.http.get(proxy.url + "/v1/models", headers=headers).status_code for _ in range(3)]
    assert statuses.count(429) >= 1
    limited = proxy.http.get(proxy.url + "/v1/models", headers=headers)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limited"
    ollama = proxy.http.get(proxy.url + "/api/tags", headers=headers)
    assert ollama.status_code == 429 and set(ollama.json()) == {"error"}
    assert proxy.get("/v1/models").status_code == 200  # other keys are not limited


def test_oversize_bodies_get_413_in_the_routes_shape(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()}, proxy={"max_body_mb": 0.01})
    big = {"model": "fake", "messages": [{"role": "user", "content": "x" * 20_000}]}
    openai = proxy.post("/v1/chat/completions", big)
    assert openai.status_code == 413 and "error" in openai.json() and "message" in openai.json()["error"]
    ollama = proxy.post("/api/chat", big)
    assert ollama.status_code == 413 and isinstance(ollama.json()["error"], str)
    assert proxy.backends() == []


def test_cors_is_off_by_default_and_an_allowlist_when_set(start_proxy: Start) -> None:
    plain = start_proxy({"fake": fake_profile()})
    preflight = {"Origin": "https://chat.example.org", "Access-Control-Request-Method": "POST"}
    assert "Access-Control-Allow-Origin" not in plain.http.options(plain.url + "/v1/chat/completions",
                                                                   headers=preflight).headers
    allowed = start_proxy({"fake": fake_profile()}, proxy={"cors_origins": ["https://chat.example.org"]})
    answer = allowed.http.options(allowed.url + "/v1/chat/completions", headers=preflight)
    assert answer.headers.get("Access-Control-Allow-Origin") == "https://chat.example.org"
    other = allowed.http.options(allowed.url + "/v1/chat/completions",
                                 headers={**preflight, "Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_overload_sheds_quickly_and_admitted_requests_complete(start_proxy: Start) -> None:
    proxy = start_proxy({"slow": fake_profile("--token-delay", "0.2", "--tokens", "5")},
                        proxy={"max_concurrent": 1, "max_queue": 2, "queue_timeout": 10})
    assert proxy.chat("slow").status_code == 200  # loaded
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one() -> None:
        started = time.monotonic()
        response = requests.post(proxy.url + "/v1/chat/completions", headers=proxy.headers(), timeout=30,
                                 json={"model": "slow", "messages": [{"role": "user", "content": "x"}]})
        with lock:
            results.append((response.status_code, time.monotonic() - started))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(30)
    shed = [elapsed for status, elapsed in results if status == 503]
    served = [status for status, _ in results if status == 200]
    assert len(results) == 8 and len(served) + len(shed) == 8
    assert shed and all(elapsed < 0.5 for elapsed in shed)  # refused at once, not after a wait
    assert len(served) >= 2
    assert proxy.status("slow")["leases"] == 0 and proxy.status("slow")["queued"] == 0


def test_sigterm_drains_running_streams_then_stops_children(start_proxy: Start) -> None:
    proxy = start_proxy({"slow": fake_profile("--token-delay", "0.3", "--tokens", "6")})
    stream = proxy.chat("slow", stream=True)
    lines = stream.iter_lines()
    next(lines)
    proxy.backends()
    proxy.popen.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused: dict[str, Any] = {}
    try:
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        refused["r"] = False
    except OSError:
        refused["r"] = True
    rest = b"\n".join(lines)
    assert b"[DONE]" in rest and b'"error"' not in rest  # the running answer finished
    assert refused["r"]  # no new connections while draining
    assert proxy.popen.wait(10) == 0
    assert proxy.surviving_backends() == []


def test_drain_timeout_cuts_what_is_still_running(start_proxy: Start) -> None:
    proxy = start_proxy({"endless": fake_profile("--token-delay", "0.5", "--tokens", "100")},
                        proxy={"drain_timeout": 1})
    stream = proxy.chat("endless", stream=True)
    lines = stream.iter_lines()
    next(lines)
    proxy.backends()
    started = time.monotonic()
    proxy.popen.send_signal(signal.SIGTERM)
    assert proxy.popen.wait(15) == 0
    assert 0.9 < time.monotonic() - started < 8
    assert proxy.surviving_backends() == []


def test_reload_route_is_admin_only(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    assert proxy.post("/reload").status_code == 403
    reloaded = proxy.post("/reload", admin=True)
    assert reloaded.status_code == 200 and reloaded.json()["models"] == ["fake"]


def test_prompts_stay_out_of_the_log(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    secret = "my-very-private-prompt-1234"
    assert proxy.chat("fake", content=secret).status_code == 200
    assert proxy.post("/api/chat", {"model": "fake", "stream": False,
                                    "messages": [{"role": "user", "content": secret}]}).status_code == 200
    assert secret not in proxy.log()
    assert "key=api_key" in proxy.log()  # the access log names the key, never its value
