"""The exchange and the dialect glue in-process: create_app takes a manager and an upstream as it
takes keys, so a route's whole path (parse, resolve, lease, upstream, translate, release) runs in
Flask's test client against a scripted backend answer. The real-process suites stay as they are.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from proxy.app import create_app
from proxy.config import load_config
from proxy.manager import ModelManager
from tests.conftest import API_KEY, fake_profile, write_config
from tests.test_manager import FakeLauncher

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class ScriptedResponse:
    def __init__(self, status: int, content_type: str, pieces: list[bytes]) -> None:
        self.status = status
        self.headers = {"Content-Type": content_type}
        self.pieces = pieces
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


class ScriptedUpstream:
    """The upstream seam: answers every request with the scripted pieces and records what was sent."""

    max_answer_bytes = 1 << 20

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.responses: list[ScriptedResponse] = []
        self.script: tuple[int, str, list[bytes]] = (200, "text/event-stream", [])

    def post(self, lease: Any, path: str, body: dict[str, Any], headers: Any = None) -> ScriptedResponse:
        self.sent.append((path, body))
        self.responses.append(ScriptedResponse(*self.script))
        return self.responses[-1]

    def iter_body(self, lease: Any, response: ScriptedResponse) -> Iterator[bytes]:
        yield from response.pieces

    def read(self, lease: Any, response: ScriptedResponse) -> bytes:
        response.close()
        return b"".join(response.pieces)

    def watching(self, cancelled: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(b"data: " + (event if isinstance(event, str) else json.dumps(event)).encode() + b"\n\n"
                    for event in events)


STREAM = sse({"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}], "model": "back-id"},
             {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}], "model": "back-id"},
             {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "model": "back-id"}, "[DONE]")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FlaskClient, ScriptedUpstream, ModelManager]]:
    profile = fake_profile()
    profile["command"]["model_id"] = "back-id"
    config = load_config(write_config(tmp_path, {"m": profile}))
    manager = ModelManager(config, FakeLauncher())
    upstream = ScriptedUpstream()
    app = create_app(config, manager, upstream=upstream)  # type: ignore[arg-type]  # the seam under test
    yield app.test_client(), upstream, manager
    manager.shutdown()


def leases(manager: ModelManager) -> int:
    return sum(status.leases for status in manager.snapshot())


@pytest.mark.parametrize("cut", [1, 7, 40, 10_000])
def test_an_ollama_stream_is_translated_whatever_the_backends_pieces(setup: Any, cut: int) -> None:
    client, upstream, manager = setup
    upstream.script = (200, "text/event-stream", [STREAM[i:i + cut] for i in range(0, len(STREAM), cut)])
    answer = client.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                         headers=AUTH)
    records = [json.loads(line) for line in answer.data.splitlines()]
    assert [record["message"]["content"] for record in records] == ["Hel", "lo", ""]
    assert records[-1]["done"] is True and records[-1]["eval_count"] == 2 and records[-1]["model"] == "m"
    path, sent = upstream.sent[-1]
    assert path == "/v1/chat/completions" and sent["model"] == "back-id" and sent["stream"] is True
    assert leases(manager) == 0 and upstream.responses[-1].closed


def test_a_gathered_ollama_answer_and_an_openai_stream_share_the_exchange(setup: Any) -> None:
    client, upstream, manager = setup
    upstream.script = (200, "text/event-stream", [STREAM])
    whole = client.post("/api/chat", json={"model": "m", "stream": False,
                                           "messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert whole.get_json()["message"]["content"] == "Hello" and whole.get_json()["done"] is True

    streamed = client.post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                         "messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert b'"model": "m"' in streamed.data and b"back-id" not in streamed.data  # the public name
    assert leases(manager) == 0


def test_an_in_band_error_ends_an_ollama_stream_after_the_records_before_it(setup: Any) -> None:
    client, upstream, manager = setup
    upstream.script = (200, "text/event-stream",
                       [STREAM.split(b"\n\n")[0] + b"\n\n" + sse({"error": {"message": "boom"}})])
    answer = client.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                         headers=AUTH)
    records = [json.loads(line) for line in answer.data.splitlines()]
    assert records[0]["message"]["content"] == "Hel" and records[-1] == {"error": "m: boom"}
    assert leases(manager) == 0


def test_a_streamed_answer_never_read_still_releases_its_lease(setup: Any) -> None:
    client, upstream, manager = setup
    upstream.script = (200, "text/event-stream", [STREAM])
    answer = client.post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                       "messages": [{"role": "user", "content": "hi"}]},
                         headers=AUTH, buffered=False)
    assert leases(manager) == 1
    answer.close()
    assert leases(manager) == 0 and upstream.responses[-1].closed
