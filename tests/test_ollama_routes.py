"""The real proxy.py process in front of tests/fake_backend.py, driven through the Ollama routes
(/ and /api/*) over HTTP with raw bytes: catalog, NDJSON framing, request translation, thinking,
tool calls, TabbyAPI-style streams, errors, capabilities, load/unload shortcuts, embeddings and the
model-management endpoints. The contract is shared/reference/ollama-api.md.

One proxy serves the whole module (each profile's backend starts once and stays loaded); tests
that need a clean slate unload through the admin route first.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests

from tests.conftest import ProxyProcess, fake_profile, free_port, write_config

PROFILES: dict[str, dict[str, Any]] = {
    "fake": fake_profile(
        "--record", aliases=["fake-alias", "fakey:7b"], context_length=4096, license="Apache-2.0",
        details={"format": "gguf", "family": "llama", "parameter_size": "135M", "quantization_level": "Q4_1",
                 "size": 123456789, "size_vram": 100000000},
        template={"system": "Be brief.", "max_tokens": 64, "temperature": 0.3, "stop": ["</s>", "<|im_end|>"]},
    ),
    "think": fake_profile("--reasoning", "3", "--record"),
    "tools": fake_profile("--tool-call", "get_weather", "--record"),
    "tabby": fake_profile("--tabby-style", "--crlf"),
    "plain": fake_profile(capabilities=["completion"]),
    "failing": fake_profile(template={"fake_status": 400}),
    "flaky": fake_profile("--error-after", "2"),
    "dies": fake_profile("--exit-during-startup"),
    "slow": fake_profile("--token-delay", "0.25", "--tokens", "4"),
    "loader": fake_profile(),
}
ALIASES = ("fake-alias", "fakey:7b")
CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z")
LOCAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}(Z|[+-]\d{2}:\d{2})")
METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration")
DETAIL_KEYS = ("parent_model", "format", "family", "families", "parameter_size", "quantization_level")
FAKE_TEXT = "tok0 tok1 tok2 tok3 tok4 "
FAKE_VECTOR = [0.1, 0.2, 0.3]
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy for the module; at teardown it stops and no backend it started may survive."""
    config_path = write_config(tmp_path_factory.mktemp("ollama"), PROFILES, proxy={"max_loaded_models": 16})
    process = ProxyProcess(config_path, free_port())
    leftovers: list[int] = []
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()
        time.sleep(0.1)
        leftovers = process.kill_leftovers()
    assert not leftovers, f"backend processes outlived the proxy: {leftovers}"


# ----- helpers --------------------------------------------------------------------------------------

def send(proxy: ProxyProcess, path: str, data: bytes | str, **headers: str) -> requests.Response:
    """POST raw bytes with the API key, as a client that builds its own body would."""
    return proxy.http.post(proxy.url + path, data=data, timeout=60,
                           headers={**proxy.headers(), "Content-Type": "application/json", **headers})


def ndjson_records(response: requests.Response) -> list[dict[str, Any]]:
    """Check the NDJSON framing byte by byte and return the records."""
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0] == "application/x-ndjson"
    body = response.content
    assert body.endswith(b"\n") and not body.endswith(b"\n\n"), body[-40:]
    lines = body[:-1].split(b"\n")
    records = []
    for line in lines:
        assert line, f"blank line in {body!r}"
        record = json.loads(line)
        assert isinstance(record, dict)
        assert line == json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode(), line  # compact
        records.append(record)
    return records


def error_of(response: requests.Response, status: int) -> str:
    """Return the message of an Ollama error answer: a JSON object whose only key is "error"."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
    assert body["error"]
    return str(body["error"])


def assert_done(record: dict[str, Any], reason: str = "stop") -> None:
    assert record["done"] is True and record["done_reason"] == reason, record
    for key in METRICS:
        value = record[key]
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, (key, value)


def assert_stream_shape(records: list[dict[str, Any]], model: str, kind: str) -> None:
    """Every record echoes the model and has a 9-digit UTC created_at; one done record, last."""
    assert [record["done"] for record in records].count(True) == 1 and records[-1]["done"] is True
    for record in records:
        assert record["model"] == model
        assert CREATED_AT.fullmatch(record["created_at"]), record["created_at"]
        if kind == "chat":
            assert record["message"]["role"] == "assistant" and isinstance(record["message"]["content"], str)
            assert "response" not in record
        else:
            assert isinstance(record["response"], str) and "message" not in record
    assert_done(records[-1])


def text_of(records: list[dict[str, Any]], kind: str) -> str:
    return "".join(record["message"]["content"] if kind == "chat" else record["response"] for record in records)


def upstream_requests(proxy: ProxyProcess, model: str) -> list[dict[str, Any]]:
    """Return what the (--record) backend of a model received: [{"path", "body"}], oldest first."""
    port = proxy.status(model)["port"]
    answer = proxy.http.get(f"http://127.0.0.1:{port}/requests", timeout=10)
    assert answer.status_code == 200
    return list(answer.json()["requests"])


def last_upstream(proxy: ProxyProcess, model: str) -> dict[str, Any]:
    return upstream_requests(proxy, model)[-1]


def backend_pids(proxy: ProxyProcess) -> list[int]:
    """Return the PIDs of the proxy's live (non-zombie) backend processes."""
    return [backend.pid for backend in proxy.backends()]


def chat_body(model: str, content: str = "Say hello.", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


# ----- reachability, version, auth ----------------------------------------------------------------

def test_root_and_version_answer_without_a_key(proxy: ProxyProcess) -> None:
    plain = proxy.http
    root = plain.get(proxy.url + "/", timeout=10)
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert root.headers["Content-Type"].split(";")[0] == "text/plain"
    head = plain.head(proxy.url + "/", timeout=10)
    assert head.status_code == 200 and head.content == b""

    version = plain.get(proxy.url + "/api/version", timeout=10)
    assert version.status_code == 200
    body = version.json()
    assert set(body) == {"version"} and re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", body["version"]), body
    assert plain.head(proxy.url + "/api/version", timeout=10).status_code == 200


def test_tags_needs_the_key_and_refuses_in_ollama_shape(proxy: ProxyProcess) -> None:
    error_of(proxy.http.get(proxy.url + "/api/tags", timeout=10), 401)
    error_of(proxy.http.get(proxy.url + "/api/tags", headers={"Authorization": "Bearer wrong-key-123456"},
                            timeout=10), 401)
    error_of(proxy.http.post(proxy.url + "/api/chat", json=chat_body("fake"), timeout=10), 401)
    assert proxy.get("/api/tags").status_code == 200
    head = proxy.http.head(proxy.url + "/api/tags", headers=proxy.headers(), timeout=10)
    assert head.status_code == 200 and head.content == b""


# ----- catalog: tags, show, ps ----------------------------------------------------------------------

def test_tags_lists_every_profile_and_alias_with_complete_fields(proxy: ProxyProcess) -> None:
    response = proxy.get("/api/tags")
    assert response.status_code == 200
    models = response.json()["models"]
    expected = {f"{name}:latest" for name in PROFILES} | {"fake-alias:latest", "fakey:7b"}
    assert sorted(entry["name"] for entry in models) == sorted(expected)
    for entry in models:
        assert entry["model"] == entry["name"]
        assert LOCAL_TIME.fullmatch(entry["modified_at"]), entry["modified_at"]
        datetime.fromisoformat(entry["modified_at"])
        assert isinstance(entry["size"], int) and not isinstance(entry["size"], bool) and entry["size"] >= 0
        assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"]), entry["digest"]
        details = entry["details"]
        assert set(DETAIL_KEYS) <= set(details)
        assert all(details[key] is not None for key in DETAIL_KEYS), details
        assert all(isinstance(details[key], str) for key in DETAIL_KEYS if key != "families")
        assert isinstance(details["families"], list)
    by_name = {entry["name"]: entry for entry in models}
    fake = by_name["fake:latest"]
    assert fake["size"] == 123456789
    assert fake["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                               "parameter_size": "135M", "quantization_level": "Q4_1"}
    for alias in ("fake-alias:latest", "fakey:7b"):  # an alias is the same model under another name
        assert {key: value for key, value in by_name[alias].items() if key not in ("name", "model")} == \
               {key: value for key, value in fake.items() if key not in ("name", "model")}
    assert by_name["tabby:latest"]["digest"] != fake["digest"]


def parameter_pairs(parameters: str) -> list[tuple[str, str]]:
    """Split /api/show parameters the way Continue does: one `key value` per line."""
    pairs = []
    for line in parameters.splitlines():
        key, value = line.split(None, 1)
        pairs.append((key, value.strip()))
    return pairs


def test_show_synthesises_model_metadata(proxy: ProxyProcess) -> None:
    response = proxy.post("/api/show", {"model": "fake"})
    assert response.status_code == 200, response.text
    show = response.json()
    assert show["model_info"] == {"general.architecture": "llama", "llama.context_length": 4096}
    pairs = parameter_pairs(show["parameters"])
    assert ("num_ctx", "4096") in pairs
    assert ("num_predict", "64") in pairs and ("temperature", "0.3") in pairs  # template defaults, Ollama names
    assert [value for key, value in pairs if key == "stop"] == ['"</s>"', '"<|im_end|>"']
    assert not any(key == "max_tokens" for key, _ in pairs)
    assert isinstance(show["template"], str) and show["template"]
    assert ".Suffix" not in show["template"]  # no insert capability: Continue must not turn FIM on
    assert show["system"] == "Be brief."
    assert show["license"] == "Apache-2.0"
    assert show["capabilities"] == ["completion"]
    assert LOCAL_TIME.fullmatch(show["modified_at"]) and datetime.fromisoformat(show["modified_at"])
    tags = {entry["name"]: entry for entry in proxy.get("/api/tags").json()["models"]}
    assert show["details"] == tags["fake:latest"]["details"]
    assert show["modelfile"].startswith("FROM fake")

    legacy = proxy.post("/api/show", {"name": "fakey:7b"})  # Continue sends only `name`
    assert legacy.status_code == 200 and legacy.json() == show

    plain = proxy.post("/api/show", {"model": "plain:latest"}).json()
    assert plain["model_info"] == {"general.architecture": "unknown"}  # present, without a context length
    assert not any(key == "num_ctx" for key, _ in parameter_pairs(plain["parameters"]))
    assert plain["system"] == "" and plain["capabilities"] == ["completion"]


@pytest.mark.parametrize(("body", "status", "message"), [
    ({}, 400, "model is required"),
    ({"verbose": False}, 400, "model is required"),
    ({"model": "x"}, 404, "model 'x' not found"),
    ({"name": "nope:latest"}, 404, "model 'nope:latest' not found"),
])
def test_show_refuses_missing_and_unknown_models(proxy: ProxyProcess, body: dict[str, Any], status: int,
                                                 message: str) -> None:
    assert error_of(proxy.post("/api/show", body), status) == message


def test_ps_lists_loaded_models_with_expiry(proxy: ProxyProcess) -> None:
    proxy.get("/unload", admin=True)  # a clean slate: nothing loaded
    assert proxy.get("/api/ps").json() == {"models": []}

    assert proxy.post("/api/chat", chat_body("fake", stream=False, keep_alive="10m")).status_code == 200
    models = proxy.get("/api/ps").json()["models"]
    assert [entry["name"] for entry in models] == ["fake:latest", "fake-alias:latest", "fakey:7b"]  # as /api/tags
    entry = models[0]
    assert entry["model"] == "fake:latest" and re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
    now = datetime.now().astimezone()
    expires = datetime.fromisoformat(entry["expires_at"])
    assert LOCAL_TIME.fullmatch(entry["expires_at"])
    assert now + timedelta(seconds=570) < expires <= now + timedelta(seconds=601), (now, expires)
    assert entry["size"] == 123456789 and entry["size_vram"] == 100000000
    assert isinstance(entry["size_vram"], int) and entry["context_length"] == 4096
    assert entry["details"]["family"] == "llama"

    assert proxy.post("/api/chat", chat_body("fake", stream=False, keep_alive=-1)).status_code == 200
    entry = proxy.get("/api/ps").json()["models"][0]
    assert datetime.fromisoformat(entry["expires_at"]).year > 2200  # forever: about now + 2^63 ns

    assert proxy.post("/api/generate", {"model": "tabby", "prompt": "", "keep_alive": "1m"}).status_code == 200
    models = proxy.get("/api/ps").json()["models"]
    assert [entry["name"] for entry in models] == ["fake:latest", "fake-alias:latest", "fakey:7b",
                                                   "tabby:latest"]  # latest expiry first
    assert models[3]["context_length"] == 0 and models[3]["size_vram"] == models[3]["size"] == 0  # nothing known


# ----- NDJSON framing -------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["fake:latest", "fake", *ALIASES])
def test_chat_streams_ndjson_by_default(proxy: ProxyProcess, model: str) -> None:
    records = ndjson_records(proxy.post("/api/chat", chat_body(model)))  # no "stream": Ollama streams
    assert_stream_shape(records, model, "chat")
    assert len(records) == 6  # one record per token, then done
    assert text_of(records, "chat") == FAKE_TEXT
    done = records[-1]
    assert done["message"] == {"role": "assistant", "content": ""}
    assert done["prompt_eval_count"] == 3 and done["eval_count"] == 5  # from the backend's usage
    assert "context" not in done


@pytest.mark.parametrize("model", ["fake:latest", "fake-alias"])
def test_generate_streams_ndjson_by_default(proxy: ProxyProcess, model: str) -> None:
    records = ndjson_records(proxy.post("/api/generate", {"model": model, "prompt": "Why is the sky blue?"}))
    assert_stream_shape(records, model, "generate")
    assert text_of(records, "generate") == FAKE_TEXT
    assert records[-1]["response"] == "" and records[-1]["eval_count"] == 5
    assert records[-1]["context"] == []  # only the done record: the Vercel AI SDK requires it there
    assert not any("context" in record for record in records[:-1])


@pytest.mark.parametrize("stream", [True, False])
def test_generate_done_record_carries_a_context_unless_raw(proxy: ProxyProcess, stream: bool) -> None:
    def done_of(body: dict[str, Any]) -> dict[str, Any]:
        response = proxy.post("/api/generate", {"model": "fake", "stream": stream, **body})
        assert response.status_code == 200, response.text
        return ndjson_records(response)[-1] if stream else response.json()

    plain = done_of({"prompt": "Why is the sky blue?"})
    assert plain["done"] is True and isinstance(plain["context"], list)
    assert isinstance(done_of({"prompt": "def add(", "suffix": "return a + b"})["context"], list)
    assert "context" not in done_of({"prompt": "<|im_start|>user\nhi<|im_end|>\n", "raw": True})  # as Ollama


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_stream_false_answers_one_json_object(proxy: ProxyProcess, path: str) -> None:
    body = chat_body("fake-alias", stream=False) if path == "/api/chat" else \
        {"model": "fake-alias", "prompt": "hi", "stream": False}
    response = proxy.post(path, body)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert response.content.rstrip(b"\n").count(b"\n") == 0  # one object, not NDJSON
    answer = response.json()
    assert answer["model"] == "fake-alias" and CREATED_AT.fullmatch(answer["created_at"])
    if path == "/api/chat":
        assert answer["message"] == {"role": "assistant", "content": FAKE_TEXT}
    else:
        assert answer["response"] == FAKE_TEXT
    assert_done(answer)
    assert answer["prompt_eval_count"] == 3 and answer["eval_count"] == 5


def test_tokens_are_relayed_as_they_arrive(proxy: ProxyProcess) -> None:
    assert proxy.post("/api/generate", {"model": "slow", "prompt": ""}).json()["done_reason"] == "load"
    started = time.monotonic()
    response = proxy.post("/api/chat", chat_body("slow"), stream=True)
    assert response.status_code == 200
    arrivals = []
    for line in response.iter_lines():
        record = json.loads(line)
        if not record["done"]:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    assert arrivals[0] < 0.6, arrivals  # the first token is not held back until the end
    assert arrivals[-1] - arrivals[0] > 0.5, arrivals  # 3 gaps of 0.25 s at the backend
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert all(gap > 0.1 for gap in gaps), gaps


def test_ps_shows_now_plus_keep_alive_while_a_request_runs(proxy: ProxyProcess) -> None:
    response = proxy.post("/api/chat", chat_body("slow", keep_alive="2m"), stream=True)
    lines = response.iter_lines()
    assert json.loads(next(lines))["done"] is False  # the stream is running: the model holds a lease
    [entry] = [entry for entry in proxy.get("/api/ps").json()["models"] if entry["name"] == "slow:latest"]
    now = datetime.now().astimezone()
    expires = datetime.fromisoformat(entry["expires_at"])
    assert now + timedelta(seconds=100) < expires <= now + timedelta(seconds=121), (now, expires)
    records = [json.loads(line) for line in lines]
    assert records[-1]["done"] is True and proxy.status("slow")["leases"] == 0


# ----- request translation (seen by the recording backend) ------------------------------------------

def test_chat_request_is_translated_for_the_backend(proxy: ProxyProcess) -> None:
    body = {
        "model": "fake-alias",
        "stream": False,
        "keep_alive": "5m",
        "format": "json",
        "options": {"num_predict": 3, "repeat_penalty": 1.1, "stop": ["x", "y"], "temperature": 0.5, "seed": 42,
                    "num_ctx": 8192, "num_gpu": 99},
        "tools": [{"type": "function", "function": {
            "name": "get_time", "parameters": {"type": "object", "properties": {}, "required": []}}}],
        "messages": [
            {"role": "user", "content": "What is in this picture?", "images": [PNG_B64]},
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]},
            {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        ],
    }
    response = proxy.post("/api/chat", body)
    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"] == "tok0 tok1 tok2 "  # num_predict 3 reached the backend
    sent = last_upstream(proxy, "fake")
    assert sent["path"] == "/v1/chat/completions"
    upstream = sent["body"]
    assert upstream["model"] == "fake"
    assert upstream["max_tokens"] == 3 and upstream["repeat_penalty"] == 1.1  # llama.cpp dialect names
    assert upstream["stop"] == ["x", "y"] and upstream["temperature"] == 0.5 and upstream["seed"] == 42
    assert "keep_alive" not in upstream and "options" not in upstream
    assert "num_ctx" not in upstream and "num_gpu" not in upstream  # runner-level options are dropped
    assert upstream["stream"] is True and upstream["stream_options"] == {"include_usage": True}
    assert upstream["response_format"] == {"type": "json_object"}
    assert upstream["tools"] == [{"type": "function", "function": {
        "description": "", "name": "get_time", "parameters": {"type": "object", "properties": {}, "required": []}}}]
    system, user, assistant, tool = upstream["messages"]
    assert system == {"role": "system", "content": "Be brief."}  # the profile's system prompt
    assert user["role"] == "user" and user["content"] == [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]
    [call] = assistant["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_time"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"zone": "UTC"}
    assert call["id"] and tool == {"role": "tool", "content": "12:00", "tool_call_id": call["id"]}


def test_stream_options_and_template_defaults_reach_the_backend(proxy: ProxyProcess) -> None:
    records = ndjson_records(proxy.post("/api/chat", chat_body("fake", options={"num_predict": -1})))
    assert text_of(records, "chat") == FAKE_TEXT
    upstream = last_upstream(proxy, "fake")["body"]
    assert upstream["stream"] is True and upstream["stream_options"] == {"include_usage": True}
    assert upstream["max_tokens"] == 64  # -1 leaves it out, so the profile's default applies
    assert upstream["temperature"] == 0.3 and upstream["stop"] == ["</s>", "<|im_end|>"]

    own_system = chat_body("fake", stream=False)
    own_system["messages"].insert(0, {"role": "system", "content": "Talk like a pirate."})
    assert proxy.post("/api/chat", own_system).status_code == 200
    messages = last_upstream(proxy, "fake")["body"]["messages"]
    assert messages[0] == {"role": "system", "content": "Talk like a pirate."} and len(messages) == 2


@pytest.mark.parametrize(("fields", "expected", "absent"), [
    ({"format": {"type": "object", "properties": {"a": {"type": "string"}}}},
     {"response_format": {"type": "json_schema", "json_schema": {
         "name": "format", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}}, ["json_schema"]),
    ({"format": ""}, {}, ["response_format", "json_schema"]),
    ({"think": "high"}, {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high"},
     ["enable_thinking"]),
    ({"think": "max"}, {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high"}, []),
    ({"options": {"num_predict": 99999}}, {"max_tokens": 4096}, []),  # clamped to the context
    ({"options": {"num_predict": 0}}, {"max_tokens": 0}, []),
    ({"options": {"stop": "END"}}, {"stop": ["END"]}, []),
    ({"options": {"top_k": 7, "typical_p": 0.9, "repeat_last_n": 32, "num_keep": 5, "tfs_z": 1.0}},
     {"top_k": 7, "typical_p": 0.9, "repeat_last_n": 32, "n_keep": 5}, ["typical", "penalty_range", "tfs", "tfs_z"]),
    ({"options": {"repeat_penalty": 0}}, {}, ["repeat_penalty", "repetition_penalty"]),  # 0 means unset
    ({"logprobs": True, "top_logprobs": 3}, {"logprobs": True, "top_logprobs": 3}, []),
])
def test_optional_fields_map_to_llamacpp_fields(proxy: ProxyProcess, fields: dict[str, Any],
                                                 expected: dict[str, Any], absent: list[str]) -> None:
    response = proxy.post("/api/chat", chat_body("fake", stream=False, **fields))
    assert response.status_code == 200, response.text
    upstream = last_upstream(proxy, "fake")["body"]
    for key, value in expected.items():
        assert upstream.get(key) == value, (key, upstream.get(key))
    for key in [*absent, "format", "think", "options", "keep_alive"]:  # Ollama's own fields never go upstream
        assert key not in upstream, (key, upstream[key])


def test_generate_with_system_images_and_raw_is_translated(proxy: ProxyProcess) -> None:
    answer = proxy.post("/api/generate", {"model": "fake", "prompt": "Why?", "system": "You are terse.",
                                          "images": [PNG_B64], "stream": False})
    assert answer.status_code == 200 and answer.json()["response"] == FAKE_TEXT
    sent = last_upstream(proxy, "fake")
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Why?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]},
    ]

    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    records = ndjson_records(proxy.post("/api/generate", {"model": "fake", "prompt": prompt, "raw": True}))
    assert_stream_shape(records, "fake", "generate")
    assert text_of(records, "generate") == FAKE_TEXT
    sent = last_upstream(proxy, "fake")
    assert sent["path"] == "/v1/completions"
    assert sent["body"]["prompt"] == prompt and "messages" not in sent["body"]
    assert sent["body"]["stream_options"] == {"include_usage": True}

    refused = proxy.post("/api/generate", {"model": "fake", "prompt": "x", "raw": True, "system": "s"})
    assert error_of(refused, 400) == "raw mode does not support template, system, or context"


# ----- thinking, tool calls, TabbyAPI-style streams -------------------------------------------------

def test_reasoning_becomes_thinking_records(proxy: ProxyProcess) -> None:
    records = ndjson_records(proxy.post("/api/chat", chat_body("think")))
    assert_stream_shape(records, "think", "chat")
    thinking = [record for record in records if "thinking" in record["message"]]
    assert [record["message"] for record in thinking] == [
        {"role": "assistant", "content": "", "thinking": f"think{i} "} for i in range(3)]
    assert records[:3] == thinking  # the reasoning comes first
    assert text_of(records, "chat") == FAKE_TEXT  # thinking text never lands in content
    assert "chat_template_kwargs" not in last_upstream(proxy, "think")["body"]  # absent think: the model decides

    answer = proxy.post("/api/chat", chat_body("think", think=True, stream=False)).json()
    assert answer["message"] == {"role": "assistant", "content": FAKE_TEXT, "thinking": "think0 think1 think2 "}
    assert last_upstream(proxy, "think")["body"]["chat_template_kwargs"] == {"enable_thinking": True}

    generated = ndjson_records(proxy.post("/api/generate", {"model": "think", "prompt": "hmm"}))
    assert [record["thinking"] for record in generated if "thinking" in record] == [f"think{i} " for i in range(3)]
    assert all(record["response"] == "" for record in generated if "thinking" in record)


def test_think_false_drops_reasoning(proxy: ProxyProcess) -> None:
    records = ndjson_records(proxy.post("/api/chat", chat_body("think", think=False)))
    assert_stream_shape(records, "think", "chat")
    assert not any("thinking" in record["message"] for record in records)
    assert text_of(records, "chat") == FAKE_TEXT and len(records) == 6
    assert last_upstream(proxy, "think")["body"]["chat_template_kwargs"] == {"enable_thinking": False}
    answer = proxy.post("/api/generate", {"model": "think", "prompt": "x", "think": False, "stream": False}).json()
    assert answer["response"] == FAKE_TEXT and "thinking" not in answer


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


def test_streamed_tool_call_fragments_become_one_complete_call(proxy: ProxyProcess) -> None:
    records = ndjson_records(proxy.post("/api/chat", chat_body("tools", "Weather in Tokyo?", tools=[WEATHER_TOOL])))
    assert_stream_shape(records, "tools", "chat")
    with_calls = [record for record in records if "tool_calls" in record["message"]]
    assert len(with_calls) == 1
    message = with_calls[0]["message"]
    assert message["role"] == "assistant" and message["content"] == ""
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == {"city": "Tokyo", "days": 2}  # an object, not a string
    assert call["function"]["index"] == 0 and call["id"] == "call_fake0"
    assert records[-1]["done_reason"] == "stop"  # never "tool_calls"
    assert last_upstream(proxy, "tools")["body"]["tools"] == [WEATHER_TOOL]


def test_non_stream_tool_call_has_object_arguments(proxy: ProxyProcess) -> None:
    response = proxy.post("/api/chat", chat_body("tools", "Weather?", tools=[WEATHER_TOOL], stream=False))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["message"]["role"] == "assistant" and answer["message"]["content"] == ""
    assert answer["message"]["tool_calls"] == [
        {"id": "call_fake0", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo", "days": 2}}}]
    assert_done(answer)


def test_tabby_style_stream_without_roles_pings_and_crlf(proxy: ProxyProcess) -> None:
    records = ndjson_records(proxy.post("/api/chat", chat_body("tabby")))
    assert_stream_shape(records, "tabby", "chat")  # role "assistant" though the deltas had none
    assert text_of(records, "chat") == FAKE_TEXT and len(records) == 6  # the ": ping" comment added nothing
    done = records[-1]
    assert done["prompt_eval_duration"] == 500_000_000 and done["eval_duration"] == 1_250_000_000
    assert done["prompt_eval_count"] == 3 and done["eval_count"] == 5

    answer = proxy.post("/api/generate", {"model": "tabby", "prompt": "x", "stream": False}).json()
    assert answer["response"] == FAKE_TEXT and answer["eval_duration"] == 1_250_000_000


# ----- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_upstream_4xx_keeps_its_status_before_any_line(proxy: ProxyProcess, path: str) -> None:
    body = chat_body("failing") if path == "/api/chat" else {"model": "failing", "prompt": "hi"}
    assert error_of(proxy.post(path, body), 400) == "fake error 400"


def test_in_stream_backend_error_ends_with_an_error_line_and_no_done(proxy: ProxyProcess) -> None:
    response = proxy.post("/api/chat", chat_body("flaky"))
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == "application/x-ndjson"
    lines = response.content.split(b"\n")
    assert lines[-1] == b""  # ends with one newline
    records = [json.loads(line) for line in lines[:-1]]
    assert [record["message"]["content"] for record in records[:-1]] == ["tok0 ", "tok1 "]
    assert set(records[-1]) == {"error"} and "simulated failure" in records[-1]["error"]
    assert not any(record.get("done") for record in records)

    aggregated = proxy.post("/api/chat", chat_body("flaky", stream=False))
    assert "simulated failure" in error_of(aggregated, 502)
    assert proxy.status("flaky")["leases"] == 0


def test_backend_exit_during_start_is_a_502_naming_the_model(proxy: ProxyProcess) -> None:
    message = error_of(proxy.post("/api/chat", chat_body("dies")), 502)
    assert "dies" in message
    message = error_of(proxy.post("/api/generate", {"model": "dies", "prompt": "hi", "stream": False}), 502)
    assert "dies" in message
    assert not any(entry["name"] == "dies:latest" for entry in proxy.get("/api/ps").json()["models"])


@pytest.mark.parametrize(("path", "data", "needle"), [
    ("/api/chat", b"{not json", "invalid JSON"),
    ("/api/generate", b'{"model": "fake",', "invalid JSON"),
    ("/api/chat", b"", "missing request body"),
    ("/api/generate", b"", "missing request body"),
    ("/api/embed", b"", "missing request body"),
    ("/api/chat", b"[1, 2]", "JSON object"),
    ("/api/chat", json.dumps(chat_body("fake", keep_alive="300")), "keep_alive"),
    ("/api/chat", json.dumps(chat_body("fake", keep_alive=True)), "keep_alive"),
    ("/api/generate", json.dumps({"model": "fake", "prompt": "x", "keep_alive": "300"}), "keep_alive"),
    ("/api/chat", json.dumps(chat_body("fake", stream="yes")), "stream"),
    ("/api/chat", json.dumps(chat_body("fake", options={"stop": 5})), '"stop"'),
    ("/api/chat", json.dumps(chat_body("fake", options={"temperature": "hot"})), '"temperature"'),
    ("/api/generate", json.dumps({"model": "fake", "prompt": "x", "template": "{{ .Prompt }}"}), "template"),
    ("/api/generate", json.dumps({"model": "fake", "prompt": "x", "top_logprobs": 21}),
     "top_logprobs must be between 0 and 20"),
    ("/api/chat", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "model is required"),
])
def test_bad_requests_are_400_in_ollama_shape(proxy: ProxyProcess, path: str, data: bytes | str,
                                              needle: str) -> None:
    assert needle in error_of(send(proxy, path, data), 400)


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", chat_body("nope")),
    ("/api/generate", {"model": "nope", "prompt": "hi"}),
    ("/api/generate", {"model": "nope", "prompt": "", "keep_alive": 0}),  # even the unload shortcut
    ("/api/embed", {"model": "nope", "input": "hi"}),
    ("/api/embeddings", {"model": "nope", "prompt": "hi"}),
    ("/api/show", {"model": "nope"}),
    ("/api/pull", {"model": "nope"}),
])
def test_unknown_model_is_404(proxy: ProxyProcess, path: str, body: dict[str, Any]) -> None:
    assert error_of(proxy.post(path, body), 404) == "model 'nope' not found"


# ----- capabilities ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "verb"), [
    ("/api/chat", chat_body("plain", tools=[WEATHER_TOOL]), "tools"),
    ("/api/chat", chat_body("plain", think=True), "thinking"),
    ("/api/generate", {"model": "plain", "prompt": "x", "think": "high"}, "thinking"),
    ("/api/chat", {"model": "plain", "messages": [{"role": "user", "content": "?", "images": [PNG_B64]}]}, "vision"),
    ("/api/generate", {"model": "plain", "prompt": "x", "images": [PNG_B64]}, "vision"),
    ("/api/generate", {"model": "plain", "prompt": "x", "suffix": "y"}, "insert"),
    ("/api/embed", {"model": "plain", "input": "x"}, "embeddings: its profile's capabilities do not list embedding"),
    ("/api/embeddings", {"model": "plain", "prompt": "x"}, "embeddings: its profile's capabilities do not list embedding"),
])
def test_declared_capabilities_refuse_what_the_model_cannot_do(proxy: ProxyProcess, path: str,
                                                               body: dict[str, Any], verb: str) -> None:
    message = error_of(proxy.post(path, body), 400)
    assert message.startswith(f'"plain" does not support {verb}')
    if verb.startswith("embeddings"):  # says what to change, and where
        assert message.endswith("add it to capabilities in model_configs/plain.yml if the backend serves them")
    else:
        assert message == f'"plain" does not support {verb}'


def test_think_false_is_accepted_without_the_thinking_capability(proxy: ProxyProcess) -> None:
    response = proxy.post("/api/chat", chat_body("plain", think=False, stream=False))
    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"] == FAKE_TEXT


# ----- load/unload shortcuts ------------------------------------------------------------------------

def loader_pid(proxy: ProxyProcess) -> int | None:
    status = proxy.status("loader")
    return status["pid"] if status["state"] == "ready" else None


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
def test_empty_request_loads_and_keep_alive_zero_unloads(proxy: ProxyProcess, path: str) -> None:
    load = {"model": "loader:latest", "prompt": ""} if path == "/api/generate" else {"model": "loader:latest"}
    response = proxy.post(path, load)  # "stream" absent, yet one JSON object
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    answer = response.json()
    assert answer["model"] == "loader:latest" and CREATED_AT.fullmatch(answer["created_at"])
    assert answer["done"] is True and answer["done_reason"] == "load"
    if path == "/api/chat":
        assert answer["message"] == {"role": "assistant", "content": ""}
    else:
        assert answer["response"] == ""
    pid = loader_pid(proxy)
    assert pid is not None and pid in backend_pids(proxy)
    assert "loader:latest" in [entry["name"] for entry in proxy.get("/api/ps").json()["models"]]

    unload = {**load, "keep_alive": 0}
    if path == "/api/chat":
        unload["messages"] = []
    answer = proxy.post(path, unload).json()
    assert answer["done"] is True and answer["done_reason"] == "unload" and answer["model"] == "loader:latest"
    proxy.wait_for(lambda: pid not in backend_pids(proxy) and proxy.status("loader")["state"] == "stopped",
                   timeout_s=3, what="the loader backend to exit")
    assert pid not in proxy.surviving_backends()  # checked in the OS process table
    assert "loader:latest" not in [entry["name"] for entry in proxy.get("/api/ps").json()["models"]]

    again = proxy.post(path, unload)  # unloading what is not loaded is still a 200 "unload"
    assert again.status_code == 200 and again.json()["done_reason"] == "unload"
    assert proxy.status("loader")["state"] == "stopped"


def test_unload_of_a_model_that_never_loaded_is_200(proxy: ProxyProcess) -> None:
    answer = proxy.post("/api/generate", {"model": "dies", "prompt": "", "keep_alive": 0})
    assert answer.status_code == 200 and answer.json()["done_reason"] == "unload"


# ----- embeddings -----------------------------------------------------------------------------------

def normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector]


def test_embed_returns_normalised_vectors_in_order(proxy: ProxyProcess) -> None:
    single = proxy.post("/api/embed", {"model": "fake-alias", "input": "hello"})
    assert single.status_code == 200, single.text
    answer = single.json()
    assert answer["model"] == "fake-alias"
    assert answer["embeddings"] == [pytest.approx(normalised(FAKE_VECTOR))]
    assert isinstance(answer["prompt_eval_count"], int) and answer["prompt_eval_count"] == 1
    assert isinstance(answer["total_duration"], int) and isinstance(answer["load_duration"], int)
    sent = last_upstream(proxy, "fake")
    assert sent["path"] == "/v1/embeddings" and sent["body"] == {"input": "hello", "model": "fake"}

    batch = proxy.post("/api/embed", {"model": "fake", "input": ["a", "b", "c"], "keep_alive": "5m"}).json()
    assert len(batch["embeddings"]) == 3
    for vector in batch["embeddings"]:
        assert vector == pytest.approx(normalised(FAKE_VECTOR))
        assert math.sqrt(sum(value * value for value in vector)) == pytest.approx(1.0)
    assert last_upstream(proxy, "fake")["body"]["input"] == ["a", "b", "c"]

    cut = proxy.post("/api/embed", {"model": "fake", "input": "x", "dimensions": 2}).json()
    assert cut["embeddings"] == [pytest.approx(normalised(FAKE_VECTOR[:2]))]


@pytest.mark.parametrize("given", [42, [1, 2], ["a", 3], {"text": "a"}])
def test_embed_refuses_an_invalid_input_type(proxy: ProxyProcess, given: object) -> None:
    assert error_of(proxy.post("/api/embed", {"model": "fake", "input": given}), 400) == "invalid input type"


@pytest.mark.parametrize("body", [{"model": "fake", "input": ""}, {"model": "fake", "input": []}, {"model": "fake"}])
def test_empty_embed_is_the_load_shortcut(proxy: ProxyProcess, body: dict[str, Any]) -> None:
    response = proxy.post("/api/embed", body)
    assert response.status_code == 200 and response.json() == {"model": "fake", "embeddings": []}
    assert proxy.status("fake")["state"] == "ready"


def test_legacy_embeddings_are_not_normalised(proxy: ProxyProcess) -> None:
    response = proxy.post("/api/embeddings", {"model": "fake", "prompt": "hello"})
    assert response.status_code == 200 and response.json() == {"embedding": FAKE_VECTOR}
    assert proxy.post("/api/embeddings", {"model": "fake", "prompt": ""}).json() == {"embedding": []}


# ----- model management -----------------------------------------------------------------------------

def test_pull_succeeds_for_known_models(proxy: ProxyProcess) -> None:
    response = proxy.post("/api/pull", {"model": "fakey:7b"})
    assert ndjson_records(response) == [{"status": "pulling manifest"}, {"status": "success"}]
    single = proxy.post("/api/pull", {"model": "fake", "stream": False})
    assert single.status_code == 200 and single.headers["Content-Type"].split(";")[0] == "application/json"
    assert single.json() == {"status": "success"}
    assert proxy.post("/api/pull", {"name": "fake-alias", "stream": False}).json() == {"status": "success"}


def test_model_management_is_refused_in_ollama_shape(proxy: ProxyProcess) -> None:
    delete = proxy.http.delete(proxy.url + "/api/delete", json={"model": "fake"}, headers=proxy.headers(), timeout=10)
    error_of(delete, 403)
    error_of(proxy.post("/api/copy", {"source": "fake", "destination": "copy"}), 403)
    error_of(proxy.post("/api/create", {"model": "new", "from": "fake"}), 501)
    error_of(proxy.post("/api/push", {"model": "fake"}), 501)
    error_of(proxy.get("/api/xyz"), 404)
    error_of(proxy.post("/api/xyz", {}), 404)
    assert proxy.get("/api/tags").status_code == 200  # nothing was deleted


# ----- what clients read about versions and keys, and lengths beyond the context (issue 12) ---------

def test_version_is_open_to_keyless_probes_but_refuses_a_wrong_key(proxy: ProxyProcess) -> None:
    keyless = proxy.http.get(proxy.url + "/api/version", timeout=10)
    assert keyless.status_code == 200 and keyless.json() == {"version": "0.13.5"}  # Codex refuses below 0.13.4
    assert proxy.get("/api/version").status_code == 200
    wrong = proxy.http.get(proxy.url + "/api/version", headers={"Authorization": "Bearer wrong-key-0123456789"},
                           timeout=10)
    assert wrong.status_code == 401 and wrong.json() == {"error": "invalid API key"}


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_an_answer_length_beyond_the_context_is_clamped_not_refused(proxy: ProxyProcess, field: str) -> None:
    answer = proxy.post("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                                 field: 32000})
    assert answer.status_code == 200, answer.text
    assert answer.json()["echo"][field] == 4096  # the profile's context_length
    small = proxy.post("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                                field: 100})
    assert small.json()["echo"][field] == 100
