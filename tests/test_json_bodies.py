"""Request bodies that are not JSON a backend can take: nesting deep enough to exhaust Python's
recursion, and NaN/Infinity (not JSON, RFC 8259). Both are a 400 in each route's own shape,
through the real proxy.py; nothing reaches the backend.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


BODIES = {
    "deep-990": '{"model": "fake", "messages": [{"role": "user", "content": "x"}], "stop": %s}' % deep(990),
    "deep-100000": '{"model": "fake", "messages": [{"role": "user", "content": "x"}], "stop": %s}' % deep(100_000),
    "nan": '{"model": "fake", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "infinity": '{"model": "fake", "messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}',
}


@pytest.mark.parametrize("body", [pytest.param(text, id=name) for name, text in BODIES.items()])
def test_deep_or_non_finite_json_is_a_400_in_each_dialect(start_proxy: Start, body: str) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    headers = {**proxy.headers(), "Content-Type": "application/json"}
    openai = proxy.http.post(proxy.url + "/v1/chat/completions", data=body, headers=headers, timeout=10)
    assert openai.status_code == 400, openai.text[:300]
    assert openai.json()["error"]["code"] == "invalid_request"
    ollama = proxy.http.post(proxy.url + "/api/chat", data=body, headers=headers, timeout=10)
    assert ollama.status_code == 400, ollama.text[:300]
    assert set(ollama.json()) == {"error"} and isinstance(ollama.json()["error"], str)
    assert proxy.backends() == []  # refused before any model was loaded
    assert "Traceback" not in proxy.log()


def test_ordinary_nesting_and_numbers_still_pass(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    schema: dict[str, object] = {"type": "string"}
    for _ in range(20):  # a deep but real JSON schema
        schema = {"type": "object", "properties": {"inner": schema}}
    answer = proxy.post("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                                                 "temperature": 0.5, "response_format": {
                                                     "type": "json_schema", "json_schema": {"schema": schema}}})
    assert answer.status_code == 200
    assert proxy.post("/api/chat", {"model": "fake", "stream": False, "format": schema,
                                    "messages": [{"role": "user", "content": "x"}]}).status_code == 200
