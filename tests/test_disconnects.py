"""A client that leaves while the proxy waits on its backend is noticed: the backend request is cut,
the lease released, and the backend stops generating (once, a backend generated for 15.6 s after
the client had gone, and one trickling bytes held the lease for as long as it liked).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import requests

from tests.conftest import API_KEY, ProxyProcess, fake_profile, llamacpp_profile

Start = Callable[..., ProxyProcess]


def send_and_leave(proxy: ProxyProcess, path: str, body: dict[str, object], name: str) -> None:
    """Send a request on a raw socket, wait until it holds its lease, then hang up."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        proxy.wait_for(lambda: proxy.status(name)["leases"] == 1, timeout_s=15, what="the request holding its lease")
        time.sleep(0.3)  # the backend is generating now


def test_a_client_leaving_a_non_stream_request_cuts_the_backend_request(start_proxy: Start) -> None:
    proxy = start_proxy({"slow": fake_profile("--answer-delay", "60", "--record")})
    assert proxy.chat("slow", stream=True).status_code == 200  # loaded (streams are not delayed)
    port = proxy.status("slow")["port"]

    left = time.monotonic()
    send_and_leave(proxy, "/v1/chat/completions", {"model": "slow", "messages": [{"role": "user", "content": "x"}]},
                   "slow")
    proxy.wait_for(lambda: proxy.status("slow")["leases"] == 0, timeout_s=10, what="the lease released")
    abandoned = lambda: any(entry.get("abandoned") for entry in  # noqa: E731
                            requests.get(f"http://127.0.0.1:{port}/requests", timeout=5).json()["requests"])
    proxy.wait_for(abandoned, timeout_s=10, what="the backend seeing its request abandoned")
    assert time.monotonic() - left < 20  # not the 60 s the answer would have taken
    proxy.wait_for(lambda: " 499 " in proxy.log(), timeout_s=5, what="the 499 in the access log")


def test_a_client_leaving_a_gathered_ollama_answer_cuts_the_backend_stream(start_proxy: Start) -> None:
    proxy = start_proxy({"slow": fake_profile("--token-delay", "0.5", "--tokens", "120")})  # 60 s of tokens
    assert proxy.post("/api/generate", {"model": "slow"}).status_code == 200  # Ollama's load shortcut
    left = time.monotonic()
    send_and_leave(proxy, "/api/chat", {"model": "slow", "stream": False,
                                        "messages": [{"role": "user", "content": "x"}]}, "slow")
    proxy.wait_for(lambda: proxy.status("slow")["leases"] == 0, timeout_s=10, what="the lease released")
    assert time.monotonic() - left < 20


def test_llamacpp_stops_generating_when_the_client_of_a_non_stream_request_leaves(start_proxy: Start,
                                                                                   gguf: Path) -> None:
    # One slot (n_parallel 1): while llama.cpp still generates for a client that left, the next
    # request waits for it.
    profile = llamacpp_profile(gguf)
    profile["llamacpp"]["n_ctx"] = 4096
    proxy = start_proxy({"smol": profile})
    assert proxy.chat("smol", max_tokens=1).status_code == 200
    send_and_leave(proxy, "/v1/chat/completions",
                   {"model": "smol", "max_tokens": 3500, "temperature": 1.0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "Write a very long story."}]}, "smol")
    proxy.wait_for(lambda: proxy.status("smol")["leases"] == 0, timeout_s=10, what="the lease released")
    started = time.monotonic()
    assert proxy.chat("smol", max_tokens=4).status_code == 200
    assert time.monotonic() - started < 15  # 3,500 tokens take a minute or more on two cores
