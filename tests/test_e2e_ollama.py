"""The official `ollama` Python client, unmodified, against the real proxy in front of real SmolLM2
llama.cpp backends: its pydantic models must parse every answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import ollama
import pytest

from tests.conftest import API_KEY, ProxyProcess, llamacpp_profile

Start = Callable[..., ProxyProcess]
METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration")


@pytest.fixture
def proxy(start_proxy: Start, gguf: Path) -> ProxyProcess:
    details = {"family": "llama", "parameter_size": "135M", "quantization_level": "Q4_1"}
    embedding = {"model_path": str(gguf), "n_ctx": 1024, "embedding": True}
    return start_proxy({
        "smol-a": llamacpp_profile(gguf, aliases=["alpha"], details=details, llamacpp=embedding,
                                   template={"system": "Answer briefly.", "temperature": 0}),
        "smol-b": llamacpp_profile(gguf, details=details),
    })


@pytest.fixture
def client(proxy: ProxyProcess) -> ollama.Client:
    return ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def assert_metrics(record: ollama.ChatResponse | ollama.GenerateResponse) -> None:
    assert record.done is True and record.done_reason in ("stop", "length")
    for name in METRICS:
        value = getattr(record, name)
        assert isinstance(value, int) and value >= 1, (name, value)


def test_catalog_routes_parse(client: ollama.Client, proxy: ProxyProcess) -> None:
    listing = client.list()
    assert {model.model for model in listing.models} == {"smol-a:latest", "alpha:latest", "smol-b:latest"}
    entry = next(model for model in listing.models if model.model == "smol-a:latest")
    assert entry.size and entry.size > 90_000_000 and entry.details and entry.details.family == "llama"
    assert isinstance(entry.modified_at, datetime)

    shown = client.show("alpha")
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 1024
    assert shown.capabilities is not None and "embedding" in shown.capabilities
    assert "num_ctx" in (shown.parameters or "")
    assert proxy.post("/api/show", {"model": "alpha"}).json()["system"] == "Answer briefly."  # not in the client's model

    assert client.ps().models == []
    client.chat(model="smol-a", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    running = client.ps().models
    assert [model.model for model in running] == ["smol-a:latest", "alpha:latest"]  # every name /api/tags lists
    assert running[0].expires_at is not None and running[0].expires_at > datetime.now(timezone.utc)
    assert running[0].context_length == 1024


def test_chat_stream_and_non_stream_agree(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    options = {"temperature": 0, "num_predict": 12}
    whole = client.chat(model="smol-a:latest", messages=messages, options=options)
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.model == "smol-a:latest"
    assert_metrics(whole)

    parts = list(client.chat(model="smol-a:latest", messages=messages, options=options, stream=True))
    assert all(part.message.role == "assistant" for part in parts)
    assert [part.done for part in parts].count(True) == 1 and parts[-1].done
    assert "".join(part.message.content or "" for part in parts) == whole.message.content
    assert_metrics(parts[-1])
    assert parts[-1].eval_count == whole.eval_count


def test_generate_stream_and_non_stream(client: ollama.Client) -> None:
    whole = client.generate(model="smol-b", prompt="The sky is", options={"temperature": 0, "num_predict": 6})
    assert whole.response and whole.done_reason == "length"
    assert_metrics(whole)
    parts = list(client.generate(model="smol-b", prompt="The sky is", stream=True,
                                 options={"temperature": 0, "num_predict": 6}))
    assert "".join(part.response for part in parts) == whole.response
    assert_metrics(parts[-1])


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    batch = client.embed(model="smol-a", input=["red", "blue"])
    assert len(batch.embeddings) == 2 and len(batch.embeddings[0]) == 576
    assert abs(sum(value * value for value in batch.embeddings[0]) - 1) < 1e-6  # L2-normalised
    single = client.embeddings(model="smol-a", prompt="red")
    assert len(single.embedding) == 576


def test_load_and_unload_shortcuts_start_and_stop_the_process(client: ollama.Client, proxy: ProxyProcess) -> None:
    loaded = client.generate(model="smol-b", prompt="")
    assert loaded.done_reason == "load"
    assert len(proxy.backends()) == 1 and proxy.status("smol-b")["state"] == "ready"

    unloaded = client.generate(model="smol-b", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    proxy.wait_for(lambda: proxy.backends() == [], timeout_s=5, what="unload shortcut")
    assert proxy.surviving_backends() == []

    chat_loaded = client.chat(model="alpha", messages=[])
    assert chat_loaded.done_reason == "load" and chat_loaded.message.role == "assistant"
    chat_unloaded = client.chat(model="alpha", messages=[], keep_alive=0)
    assert chat_unloaded.done_reason == "unload"
    proxy.wait_for(lambda: proxy.status("smol-a")["state"] == "stopped", timeout_s=5, what="chat unload")


def test_pull_errors_and_model_management(client: ollama.Client) -> None:
    assert client.pull("smol-a").status == "success"
    assert [progress.status for progress in client.pull("smol-a", stream=True)][-1] == "success"
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404 and "nope" in missing.value.error
    with pytest.raises(ollama.ResponseError) as refused:
        client.delete("smol-a")
    assert refused.value.status_code == 403


def test_swap_through_ollama_calls_leaves_one_backend(client: ollama.Client, proxy: ProxyProcess) -> None:
    client.chat(model="smol-a", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    first = proxy.backends()
    assert len(first) == 1
    client.chat(model="smol-b", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    second = proxy.backends()
    assert len(second) == 1 and second[0].pid != first[0].pid
    assert [model.model for model in client.ps().models] == ["smol-b:latest"]
    time.sleep(0.2)
    assert len(proxy.backends()) == 1
