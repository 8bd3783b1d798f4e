"""Pass-through routes (rerank, audio, images, TabbyAPI's tokenizer) through the real proxy.py in
front of tests/fake_backend.py: the model found in JSON or in a multipart field, a lease, the body
forwarded unchanged (a large upload streamed, not held in the proxy's memory), the answer relayed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from tests.conftest import ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]
PROFILES: dict[str, dict[str, Any]] = {
    "echo": fake_profile("--echo-uploads", aliases=["whisper"]),
    "bare": fake_profile(),  # serves none of these routes
}
BOUNDARY = "proxy-test-boundary-0123456789"
JSON_PATHS = ["/v1/rerank", "/rerank", "/v1/audio/speech", "/v1/images/generations", "/v1/token/encode",
              "/v1/token/decode"]


def multipart(fields: list[tuple[str, bytes, str | None]]) -> bytes:
    """Build a multipart/form-data body by hand: (name, content, filename or None) per part, in order."""
    parts = []
    for name, content, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename else ""
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def upload(proxy: ProxyProcess, path: str, body: bytes) -> Any:
    return proxy.http.post(proxy.url + path, data=body, timeout=120, headers={
        **proxy.headers(), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


@pytest.mark.parametrize("path", JSON_PATHS)
def test_json_routes_reach_the_models_backend_and_relay_its_answer(start_proxy: Start, path: str) -> None:
    proxy = start_proxy(PROFILES)
    answer = proxy.post(path, {"model": "whisper", "query": "q", "documents": ["a", "b"], "keep_alive": "1m"})
    assert answer.status_code == 200, answer.text
    echoed = answer.json()
    assert echoed["path"] == path and echoed["content_type"] == "application/json"
    assert proxy.status("echo")["state"] == "ready" and proxy.status("echo")["requests_served"] == 1
    assert proxy.status("echo")["keep_alive_s"] == 60  # keep_alive is the proxy's, as on every route


def test_a_multipart_upload_passes_byte_for_byte_with_the_model_after_the_file(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    body = multipart([("file", b"RIFF" + bytes(range(256)) * 40, "a.wav"), ("model", b"whisper", None),
                      ("language", b"en", None)])
    answer = upload(proxy, "/v1/audio/transcriptions", body)
    assert answer.status_code == 200, answer.text
    echoed = answer.json()
    assert echoed["received_bytes"] == len(body) and echoed["sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed["content_type"] == f"multipart/form-data; boundary={BOUNDARY}"
    assert proxy.status("echo")["requests_served"] == 1


def test_a_50_mb_upload_is_streamed_without_the_proxy_holding_it(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    assert upload(proxy, "/v1/audio/transcriptions", multipart([("model", b"echo", None)])).status_code == 200
    size = 50 * 1024 * 1024
    body = multipart([("model", b"echo", None), ("file", b"\x5a" * size, "big.wav")])
    process = psutil.Process(proxy.popen.pid)
    before = process.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answer = upload(proxy, "/v1/audio/transcriptions", body)
    finally:
        stop.set()
        sampler.join()
    assert answer.status_code == 200, answer.text
    assert answer.json()["received_bytes"] == len(body)
    assert answer.json()["sha256"] == hashlib.sha256(body).hexdigest()
    grown = peak[0] - before
    assert grown < 20 * 1024 * 1024, f"the proxy's RSS grew by {grown / 1048576:.1f} MiB for a 50 MiB upload"


def test_a_multipart_body_without_a_model_and_no_default_is_a_400(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    answer = upload(proxy, "/v1/audio/transcriptions", multipart([("file", b"abc", "a.wav")]))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"
    unknown = upload(proxy, "/v1/audio/transcriptions", multipart([("model", b"nope", None)]))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert not proxy.backends()


def test_a_broken_multipart_body_is_a_400(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    answer = proxy.http.post(proxy.url + "/v1/audio/transcriptions", data=b"not multipart at all", timeout=30,
                             headers={**proxy.headers(), "Content-Type": "multipart/form-data"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"


def test_a_backend_without_the_route_answers_what_it_answers(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    answer = proxy.post("/v1/rerank", {"model": "bare", "query": "q", "documents": ["a"]})
    assert answer.status_code == 404 and answer.json()["error"]["message"] == "not found"  # the fake's own
    assert proxy.status("bare")["leases"] == 0
