"""The Anthropic Messages dialect: request translation (table-driven), the event stream at the byte
level (split anywhere), and the official `anthropic` SDK against the proxy in front of the fake
backend (tool calls, reasoning, errors) and of real SmolLM2 under llama.cpp.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from proxy.dialects.anthropic import AnthropicEvents, estimated_tokens, openai_chat_from_anthropic
from proxy.errors import BadRequest, BackendFailed, anthropic_error_body, anthropic_error_event
from proxy.errors import ModelBusy, Unauthorized, UnknownModel, UpstreamError
from tests.conftest import API_KEY, ProxyProcess, fake_profile, free_port, llamacpp_profile, write_config

USER = {"role": "user", "content": "hi"}


def translate(names: str = "llamacpp", context_length: int | None = None, **body: Any) -> dict[str, Any]:
    body.setdefault("messages", [USER])
    body.setdefault("max_tokens", 64)
    return openai_chat_from_anthropic(body, names, context_length)  # type: ignore[arg-type]


# ----- requests -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"system": "Be brief."},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}),
        ({"system": [{"type": "text", "text": "A."}, {"type": "text", "text": "B.", "cache_control": {"type": "ephemeral"}}]},
         {"messages": [{"role": "system", "content": "A.\n\nB."}, {"role": "user", "content": "hi"}]}),
        ({"system": "A.", "messages": [{"role": "system", "content": "B."}, USER]},  # Claude Code sends both
         {"messages": [{"role": "system", "content": "A.\n\nB."}, {"role": "user", "content": "hi"}]}),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
         {"messages": [{"role": "user", "content": "ab"}]}),
        ({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
            {"type": "text", "text": "what?"}]}]},
         {"messages": [{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
             {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
             {"type": "text", "text": "what?"}]}]}),
        ({"messages": [USER, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": ""},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "days": 2}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "no such city"}]},
                {"type": "text", "text": "thanks"}]}]},
         {"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "Let me look.", "reasoning_content": "hmm", "tool_calls": [
                           {"id": "toolu_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
                       {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                       {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such city"},
                       {"role": "user", "content": "thanks"}]}),
        ({"stop_sequences": ["END", "\n\n"]}, {"stop": ["END", "\n\n"]}),
        ({"temperature": 0, "top_p": 0.9, "top_k": 40}, {"temperature": 0, "top_p": 0.9, "top_k": 40}),
        ({"metadata": {"user_id": "u1"}, "service_tier": "auto"}, {}),
        ({"tools": [{"name": "get_weather", "description": "Weather.", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]},
         {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}),
        ({"tools": [{"name": "noop", "input_schema": {"type": "object"}},
                    {"type": "web_search_20250305", "name": "web_search"}]},  # a server tool: left out
         {"tools": [{"type": "function", "function": {"name": "noop", "description": "",
                                                      "parameters": {"type": "object"}}}]}),
        ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, {"chat_template_kwargs": {"enable_thinking": True}}),
        ({"thinking": {"type": "adaptive"}}, {"chat_template_kwargs": {"enable_thinking": True}}),
        ({"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"enable_thinking": False}}),
        ({"thinking": "loud"}, {}),  # never a 400
    ],
)
def test_a_messages_body_becomes_these_chat_fields(body: dict[str, Any], expected: dict[str, Any]) -> None:
    request = translate(**body)
    assert request.pop("max_tokens") == 64
    if "messages" not in expected:
        assert request.pop("messages") == [{"role": "user", "content": "hi"}]
    assert request == expected


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "tool", "name": "noop"}, {"tool_choice": {"type": "function", "function": {"name": "noop"}}}),
        ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    ],
)
def test_tool_choice_maps_to_openais(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    request = translate(tools=[{"name": "noop", "input_schema": {"type": "object"}}], tool_choice=choice)
    assert {key: request[key] for key in expected} == expected


@pytest.mark.parametrize(("names", "expected"), [("tabbyapi", {"enable_thinking": True}),
                                                 ("llamacpp", {"chat_template_kwargs": {"enable_thinking": True}})])
def test_thinking_uses_each_backends_switch(names: str, expected: dict[str, Any]) -> None:
    request = translate(names, thinking={"type": "enabled", "budget_tokens": 1024})
    assert {key: request[key] for key in expected} == expected


@pytest.mark.parametrize(("max_tokens", "context_length", "sent"), [(32000, 8192, 8192), (100, 8192, 100), (32000, None, 32000)])
def test_max_tokens_beyond_the_context_is_clamped(max_tokens: int, context_length: int | None, sent: int) -> None:
    assert translate(context_length=context_length, max_tokens=max_tokens)["max_tokens"] == sent


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "video"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]}, "source"),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": []}]}]}, "input"),
        ({"system": 3}, "system"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"temperature": "hot"}, "temperature"),
        ({"tools": [{"description": "no name"}]}, "name"),
        ({"tools": [{"name": "t", "input_schema": {}}], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ],
)
def test_a_malformed_body_is_a_bad_request_naming_the_field(body: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest, match=named):
        translate(**body)


def test_count_tokens_bodies_need_no_max_tokens_and_the_estimate_grows_with_the_prompt() -> None:
    short = openai_chat_from_anthropic({"messages": [USER]}, "llamacpp", counting=True)
    long = openai_chat_from_anthropic({"messages": [{"role": "user", "content": "word " * 400}]}, "llamacpp",
                                      counting=True)
    assert "max_tokens" not in short
    assert 0 < estimated_tokens(short) < 20 and 400 <= estimated_tokens(long) <= 600


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [(BadRequest("x"), 400, "invalid_request_error"), (Unauthorized("x"), 401, "authentication_error"),
     (UnknownModel("x"), 404, "not_found_error"), (ModelBusy("x"), 503, "overloaded_error"),
     (BackendFailed("x"), 502, "api_error"), (UpstreamError(422, "x"), 422, "invalid_request_error")],
)
def test_errors_take_anthropics_shape_and_type(error: Any, status: int, kind: str) -> None:
    assert error.status == status
    assert anthropic_error_body(error) == {"type": "error", "error": {"type": kind, "message": "x"}}


# ----- the event stream, at the byte level ----------------------------------------------------------

def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(b"data: " + (event if isinstance(event, str) else json.dumps(event)).encode() + b"\n\n"
                    for event in events)


def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "model": "backend-id",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, **extra}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4}}
TEXT_STREAM = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
                  chunk({}, "stop"), USAGE, "[DONE]")
MIXED_STREAM = sse(chunk({"role": "assistant", "content": None}), chunk({"reasoning_content": "think0 "}),
                   chunk({"reasoning_content": "think1 "}), chunk({"content": "Let me check."}),
                   chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": ""}}]}),
                   chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "To'}}]}),
                   chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'kyo", "days": 2}'}}]}),
                   chunk({}, "tool_calls"), USAGE, "[DONE]")


def events_of(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Parse Anthropic's SSE bytes strictly: each event an `event:` line, a `data:` line, a blank line."""
    assert raw.endswith(b"\n\n")
    events = []
    for frame in raw[:-2].split(b"\n\n"):
        name_line, data_line = frame.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: "), frame
        name, payload = name_line[7:].decode(), json.loads(data_line[6:])
        assert payload["type"] == name
        events.append((name, payload))
    return events


def translated(raw: bytes, cuts: list[int] | None = None, **options: Any) -> bytes:
    events = AnthropicEvents(message_id="msg_1", model="claude-sonnet-4-5-local", model_name="local",
                             input_tokens=7, **options)
    bounds = [0, *sorted(cuts or []), len(raw)]
    return b"".join(events.feed(raw[start:end]) for start, end in zip(bounds, bounds[1:])) + events.flush()


def test_a_text_stream_is_anthropics_exact_event_sequence() -> None:
    events = events_of(translated(TEXT_STREAM))
    assert [name for name, _ in events] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                            "content_block_delta", "content_block_stop", "message_delta",
                                            "message_stop"]
    start = events[0][1]["message"]
    assert start == {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-local",
                     "content": [], "stop_reason": None, "stop_sequence": None,
                     "usage": {"input_tokens": 7, "output_tokens": 0}}
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [payload["delta"] for _, payload in events[3:5]] == [{"type": "text_delta", "text": "Hel"},
                                                               {"type": "text_delta", "text": "lo"}]
    assert events[6][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"input_tokens": 11, "output_tokens": 4}}


def test_thinking_text_and_a_tool_call_are_three_blocks_each_closed_before_the_next() -> None:
    events = events_of(translated(MIXED_STREAM))
    blocks = [(name, payload.get("index"), payload.get("content_block", payload.get("delta", {})).get("type"))
              for name, payload in events if name.startswith("content_block")]
    assert blocks == [
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"), ("content_block_stop", 2, None)]
    tool_start = next(payload for name, payload in events if name == "content_block_start" and payload["index"] == 2)
    assert tool_start["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    json_text = "".join(payload["delta"]["partial_json"] for name, payload in events
                        if name == "content_block_delta" and payload["index"] == 2)
    assert json.loads(json_text) == {"city": "Tokyo", "days": 2}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_gathered_answer_is_one_message_with_tool_input_parsed_in_key_order() -> None:
    events = AnthropicEvents(message_id="msg_1", model="claude-x", model_name="local", input_tokens=7, gather=True)
    assert events.feed(MIXED_STREAM) == b"" and events.flush() == b""
    message = events.message()
    assert message["content"] == [{"type": "thinking", "thinking": "think0 think1 ", "signature": ""},
                                  {"type": "text", "text": "Let me check."},
                                  {"type": "tool_use", "id": "call_1", "name": "get_weather",
                                   "input": {"city": "Tokyo", "days": 2}}]
    assert list(message["content"][2]["input"]) == ["city", "days"]
    assert (message["stop_reason"], message["usage"]) == ("tool_use", {"input_tokens": 11, "output_tokens": 4})


@pytest.mark.parametrize(
    ("finish", "extra", "reason", "sequence"),
    [("stop", {}, "end_turn", None), ("length", {}, "max_tokens", None),
     ("stop", {"stop_str": "END"}, "stop_sequence", "END"), ("stop", {"matched_stop": "##"}, "stop_sequence", "##"),
     (None, {}, "end_turn", None)],
)
def test_stop_reasons(finish: str | None, extra: dict[str, Any], reason: str, sequence: str | None) -> None:
    raw = sse(chunk({"content": "x"}), chunk({}, finish, **extra), "[DONE]")
    delta = events_of(translated(raw))[-2][1]
    assert delta["delta"] == {"stop_reason": reason, "stop_sequence": sequence}
    assert delta["usage"] == {"output_tokens": 1}  # no usage from the backend: the deltas counted


def test_a_backend_error_mid_stream_raises_after_the_events_before_it() -> None:
    events = AnthropicEvents(message_id="msg_1", model="m", model_name="local", input_tokens=1)
    before = events.feed(sse(chunk({"content": "Hel"}), {"error": {"message": "boom"}}))
    assert [name for name, _ in events_of(before)][-1] == "content_block_delta"
    with pytest.raises(UpstreamError, match="local: boom") as raised:
        events.feed(b"")
    assert events_of(anthropic_error_event(raised.value)) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "local: boom"}})]


def test_tool_arguments_that_are_not_json_are_a_502_when_gathered() -> None:
    events = AnthropicEvents(message_id="msg_1", model="m", model_name="local", input_tokens=1, gather=True)
    events.feed(sse(chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{nope"}}]}),
                    "[DONE]"))
    events.flush()
    with pytest.raises(UpstreamError, match="not JSON"):
        events.message()


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(MIXED_STREAM)), max_size=12),
       crlf=st.booleans())
def test_the_event_stream_is_the_same_wherever_the_backends_bytes_are_split(cuts: list[int], crlf: bool) -> None:
    raw = MIXED_STREAM.replace(b"\n", b"\r\n") if crlf else MIXED_STREAM
    cuts = [min(cut, len(raw)) for cut in cuts]
    assert translated(raw, cuts) == translated(MIXED_STREAM)


# ----- the official SDK against the proxy -----------------------------------------------------------

@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy for the module: `fake` (tool calls, reasoning) claims every claude-* name; `haiku`
    claims one exactly, which wins over the pattern."""
    directory = tmp_path_factory.mktemp("anthropic")
    profiles = {"fake": fake_profile("--tool-call", "get_weather", "--reasoning", "2", aliases=["claude-*"]),
                "haiku": fake_profile(aliases=["claude-haiku-4-5"])}
    process = ProxyProcess(write_config(directory, profiles), free_port())
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()
        process.kill_leftovers()


def client_for(proxy: ProxyProcess, **options: Any) -> anthropic.Anthropic:
    options.setdefault("api_key", API_KEY)
    return anthropic.Anthropic(base_url=proxy.url, max_retries=0, timeout=60, **options)


def test_sdk_create_answers_text_and_thinking_and_echoes_the_model(proxy: ProxyProcess) -> None:
    message = client_for(proxy).messages.create(
        model="claude-sonnet-4-5-local", max_tokens=32000, messages=[{"role": "user", "content": "hi"}],
        thinking={"type": "enabled", "budget_tokens": 1024}, metadata={"user_id": "me"})
    assert message.model == "claude-sonnet-4-5-local" and message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "think0 think1 "  # type: ignore[union-attr]
    assert message.content[1].text == "tok0 tok1 tok2 tok3 tok4 "  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 5 and message.usage.input_tokens == 3
    assert proxy.status("fake")["state"] == "ready"


def test_sdk_stream_gives_text_and_the_final_message(proxy: ProxyProcess) -> None:
    client = client_for(proxy, auth_token=API_KEY, api_key=None)  # Authorization: Bearer, as ANTHROPIC_AUTH_TOKEN
    with client.messages.stream(model="claude-opus-local", max_tokens=100, system="Be brief.",
                                messages=[{"role": "user", "content": "hi"}],
                                extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
                                extra_query={"beta": "true"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.stop_reason == "end_turn" and final.usage.input_tokens == 3 and final.usage.output_tokens == 5


def test_sdk_tool_use_round_trip(proxy: ProxyProcess) -> None:
    client = client_for(proxy)
    tools: Any = [{"name": "get_weather", "description": "Weather for a city.",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                                     "days": {"type": "integer"}}}}]
    messages: Any = [{"role": "user", "content": "Weather in Tokyo?"}]
    with client.messages.stream(model="claude-sonnet-4-5-local", max_tokens=200, tools=tools, messages=messages,
                                tool_choice={"type": "auto"}) as stream:
        first = stream.get_final_message()
    call = first.content[-1]
    assert first.stop_reason == "tool_use" and call.type == "tool_use"
    assert call.name == "get_weather" and call.input == {"city": "Tokyo", "days": 2}
    assert list(call.input) == ["city", "days"]  # type: ignore[arg-type]
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    whole = client.messages.create(model="claude-sonnet-4-5-local", max_tokens=200, tools=tools, messages=messages)
    assert whole.stop_reason == "tool_use" and whole.content[-1].input == {"city": "Tokyo", "days": 2}  # type: ignore[union-attr]


def test_exact_aliases_win_over_patterns(proxy: ProxyProcess) -> None:
    client_for(proxy).messages.create(model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert proxy.status("haiku")["state"] == "ready"


def test_sdk_count_tokens_estimates_without_loading_a_model(proxy: ProxyProcess) -> None:
    proxy.post("/unload", {"model": "fake"}, admin=True)
    proxy.wait_for(lambda: proxy.status("fake")["state"] == "stopped", what="fake unloaded")
    counted = client_for(proxy).messages.count_tokens(model="claude-sonnet-4-5-local",
                                                      messages=[{"role": "user", "content": "hello " * 100}])
    assert 100 <= counted.input_tokens <= 200
    assert proxy.status("fake")["state"] == "stopped"


@pytest.mark.parametrize(
    ("call", "error", "status", "kind"),
    [
        ({"model": "gpt-4o"}, anthropic.NotFoundError, 404, "not_found_error"),
        ({"max_tokens": 0}, anthropic.BadRequestError, 400, "invalid_request_error"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, anthropic.BadRequestError, 400,
         "invalid_request_error"),
        ({"api_key": "wrong"}, anthropic.AuthenticationError, 401, "authentication_error"),
    ],
)
def test_sdk_errors_are_anthropics(proxy: ProxyProcess, call: dict[str, Any], error: type[Exception], status: int,
                                   kind: str) -> None:
    client = client_for(proxy, api_key=call.pop("api_key", API_KEY))
    fields: Any = {"model": "claude-sonnet-4-5-local", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                   **call}
    with pytest.raises(error) as raised:
        client.messages.create(**fields)
    assert raised.value.status_code == status  # type: ignore[attr-defined]
    assert raised.value.body == {"type": "error", "error": {"type": kind, "message": raised.value.body["error"]["message"]}}  # type: ignore[attr-defined]


def test_x_api_key_with_anthropic_headers_and_a_mid_stream_failure(tmp_path: Path, start_proxy: Any) -> None:
    proxy = start_proxy({"broken": fake_profile("--error-after", "2", aliases=["claude-*"])})
    answer = requests.post(proxy.url + "/v1/messages?beta=true", timeout=30, stream=True, json={
        "model": "claude-sonnet-4-5-local", "max_tokens": 10, "stream": True, "messages": [USER]},
        headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "a,b"})
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/event-stream")
    events = events_of(answer.content)
    assert [name for name, _ in events][:3] == ["message_start", "ping", "content_block_start"]
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error",
                                                              "message": "broken: simulated failure"}})
    with pytest.raises(anthropic.APIStatusError, match="simulated failure"):
        with client_for(proxy).messages.stream(model="claude-x", max_tokens=10, messages=[USER]) as stream:
            stream.get_final_message()
    gone = requests.post(proxy.url + "/v1/messages", json={}, timeout=30, headers={"x-api-key": "nope"})
    assert gone.status_code == 401 and gone.json()["error"]["type"] == "authentication_error"


# ----- real SmolLM2 under llama.cpp -----------------------------------------------------------------

def test_sdk_against_real_smollm2(gguf: Path, start_proxy: Any) -> None:
    proxy = start_proxy({"smol": llamacpp_profile(gguf, aliases=["claude-*"])})
    client = client_for(proxy)
    question: Any = [{"role": "user", "content": "Say hello."}]
    message = client.messages.create(model="claude-sonnet-4-5-local", max_tokens=32000, extra_body={"temperature": 0},
                                     system="You are brief.", messages=question,
                                     thinking={"type": "adaptive"})  # type: ignore[typeddict-item]
    assert message.model == "claude-sonnet-4-5-local" and message.content[0].type == "text"
    assert message.content[0].text and message.usage.input_tokens > 5  # type: ignore[union-attr]
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=8, extra_body={"temperature": 0}, messages=question) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    counted = client.messages.count_tokens(model="claude-sonnet-4-5-local", messages=question)
    estimate = estimated_tokens(openai_chat_from_anthropic({"messages": question}, "llamacpp", counting=True))
    assert 3 <= counted.input_tokens < 40 and counted.input_tokens != estimate  # the tokenizer's, not the estimate


# ----- tier names: alias patterns -------------------------------------------------------------------

def test_alias_patterns_resolve_names_not_claimed_exactly(tmp_path: Path) -> None:
    from proxy.config import load_config

    config = load_config(write_config(tmp_path, {
        "big": fake_profile(aliases=["claude-*"]), "small": fake_profile(aliases=["claude-haiku-*", "gpt-?"]),
        "exact": fake_profile(aliases=["claude-haiku-4-5"])}))
    resolved = {name: getattr(config.resolve_model(name), "name", None) for name in (
        "claude-sonnet-4-5", "CLAUDE-OPUS-4", "claude-haiku-3", "claude-haiku-4-5", "claude-haiku-4-5:latest",
        "gpt-4", "gpt-40", "claude", "big")}
    assert resolved == {"claude-sonnet-4-5": "big", "CLAUDE-OPUS-4": "big", "claude-haiku-3": "small",
                        "claude-haiku-4-5": "exact", "claude-haiku-4-5:latest": "exact", "gpt-4": "small",
                        "gpt-40": None, "claude": None, "big": "big"}


def test_ollama_clients_are_not_shown_patterns_as_models(tmp_path: Path) -> None:
    from proxy.app import create_app
    from proxy.config import load_config
    from proxy.manager import ModelManager
    from tests.test_manager import FakeLauncher

    config = load_config(write_config(tmp_path, {"big": fake_profile(aliases=["claude-*", "big-one"])}))
    manager = ModelManager(config, FakeLauncher())
    try:
        tags = create_app(config, manager).test_client().get("/api/tags", headers={"Authorization": f"Bearer {API_KEY}"})
        assert [model["name"] for model in tags.get_json()["models"]] == ["big:latest", "big-one:latest"]
    finally:
        manager.shutdown()
