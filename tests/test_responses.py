"""The OpenAI Responses dialect: request translation (table-driven), the event stream byte by byte
(however the backend's stream is split), the route in-process, and the official `openai` SDK's
responses.create against the fake backend and against real SmolLM2 under llama.cpp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.dialects.responses import chat_from_responses
from proxy.dialects.responses_events import ResponsesEvents, response_skeleton
from proxy.errors import BadRequest, UpstreamError
from tests.conftest import API_KEY, ProxyProcess, fake_profile, llamacpp_profile
from tests.test_ollama_routes import upstream_requests
from tests.test_exchange import AUTH, leases, setup, sse  # noqa: F401  # setup: the in-process fixture
from tests.test_streaming import split_at

USER = {"role": "user", "content": "hi"}


# ----- requests -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "expected"), [
    pytest.param({"input": "hi"}, {"messages": [USER]}, id="string input"),
    pytest.param({"input": "hi", "instructions": "Be brief."},
                 {"messages": [{"role": "system", "content": "Be brief."}, USER]}, id="instructions"),
    pytest.param({"input": [{"role": "developer", "content": "Rules."}, {"type": "message", "role": "user",
                                                                         "content": [{"type": "input_text", "text": "a"},
                                                                                     {"type": "input_text", "text": "b"}]}],
                  "instructions": "Be brief."},
                 {"messages": [{"role": "system", "content": "Be brief.\n\nRules."}, {"role": "user", "content": "a\nb"}]},
                 id="developer joins instructions; text parts join"),
    pytest.param({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is it?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}]}]},
                 {"messages": [{"role": "user", "content": [
                     {"type": "text", "text": "what is it?"},
                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]}]},
                 id="input_image"),
    pytest.param({"input": [USER, {"type": "message", "role": "assistant",
                                   "content": [{"type": "output_text", "text": "Let me look."}]},
                            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Oslo"}'},
                            {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
                            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                            {"type": "function_call_output", "call_id": "c2",
                             "output": [{"type": "input_text", "text": "noon"}]}]},
                 {"messages": [USER, {"role": "assistant", "content": "Let me look.", "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
                     {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]},
                               {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                               {"role": "tool", "tool_call_id": "c2", "content": "noon"}]},
                 id="calls join the assistant turn; outputs become tool messages"),
    pytest.param({"input": [USER, {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
                            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]},
                 {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
                 id="reasoning items handed back are left out"),
    pytest.param({"input": "hi", "max_output_tokens": 16, "temperature": 0, "top_p": 0.5},
                 {"messages": [USER], "max_tokens": 16, "temperature": 0, "top_p": 0.5}, id="samplers"),
    pytest.param({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True},
                                           {"type": "web_search"}, {"type": "custom", "name": "apply_patch"}],
                  "tool_choice": "required", "parallel_tool_calls": False},
                 {"messages": [USER], "tools": [{"type": "function", "function": {
                     "name": "f", "parameters": {"type": "object"}, "description": ""}}],
                  "tool_choice": "required", "parallel_tool_calls": False},
                 id="function tools flattened; hosted and custom tools left out"),
    pytest.param({"input": "hi", "tools": [{"type": "function", "name": "f"}],
                  "tool_choice": {"type": "function", "name": "f"}},
                 {"messages": [USER], "tools": [{"type": "function", "function": {
                     "name": "f", "description": "", "parameters": {"type": "object", "properties": {}}}}],
                  "tool_choice": {"type": "function", "function": {"name": "f"}}}, id="a named tool_choice"),
    pytest.param({"input": "hi", "tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "g"}],
                  "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "g"}]}},
                 {"messages": [USER], "tools": [{"type": "function", "function": {
                     "name": "g", "description": "", "parameters": {"type": "object", "properties": {}}}}],
                  "tool_choice": "auto"}, id="allowed_tools narrows the tools"),
    pytest.param({"input": "hi", "tool_choice": "auto"}, {"messages": [USER]}, id="tool_choice without tools"),
    pytest.param({"input": "hi", "text": {"format": {"type": "text"}, "verbosity": "low"}}, {"messages": [USER]},
                 id="text format text"),
    pytest.param({"input": "hi", "store": True, "metadata": {"a": "b"}, "include": ["reasoning.encrypted_content"],
                  "truncation": "auto", "prompt_cache_key": "k"}, {"messages": [USER]}, id="what needs no translation"),
])
def test_requests_translate_to_chat(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert chat_from_responses(body, "llamacpp") == expected


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.mark.parametrize(("fields", "names", "expected"), [
    pytest.param({"text": {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}},
                 "llamacpp", {"response_format": {"type": "json_schema", "json_schema": {
                     "name": "answer", "schema": SCHEMA, "strict": True}}}, id="json_schema llamacpp"),
    pytest.param({"text": {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}}},
                 "tabbyapi", {"json_schema": SCHEMA}, id="json_schema tabbyapi"),
    pytest.param({"text": {"format": {"type": "json_object"}}}, "llamacpp",
                 {"response_format": {"type": "json_object"}}, id="json_object llamacpp"),
    pytest.param({"text": {"format": {"type": "json_object"}}}, "tabbyapi",
                 {"json_schema": {"type": "object"}}, id="json_object tabbyapi"),
    pytest.param({"reasoning": {"effort": "high"}}, "llamacpp",
                 {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high"}, id="effort llamacpp"),
    pytest.param({"reasoning": {"effort": "minimal"}}, "tabbyapi",
                 {"enable_thinking": True, "reasoning_effort": "low"}, id="minimal is low"),
    pytest.param({"reasoning": {"effort": "xhigh", "summary": "auto"}}, "tabbyapi",
                 {"enable_thinking": True, "reasoning_effort": "high"}, id="xhigh is high"),
    pytest.param({"reasoning": {"effort": "none"}}, "llamacpp",
                 {"chat_template_kwargs": {"enable_thinking": False}}, id="none turns thinking off"),
    pytest.param({"reasoning": {"summary": "auto"}}, "llamacpp", {}, id="no effort"),
])
def test_structured_output_and_reasoning_follow_the_backend(fields: dict[str, Any], names: Any,
                                                             expected: dict[str, Any]) -> None:
    assert chat_from_responses({"input": "hi", **fields}, names) == {"messages": [USER], **expected}


@pytest.mark.parametrize(("body", "named"), [
    pytest.param({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", id="previous_response_id"),
    pytest.param({"input": "hi", "conversation": "conv_1"}, "conversation", id="conversation"),
    pytest.param({"input": "hi", "background": True}, "background", id="background"),
    pytest.param({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference", id="item_reference"),
    pytest.param({}, "input: required", id="no input"),
    pytest.param({"input": [], "instructions": "x"}, "input: required", id="only instructions"),
    pytest.param({"input": 3}, "input", id="input of a wrong type"),
    pytest.param({"input": [{"role": "robot", "content": "x"}]}, "role", id="unknown role"),
    pytest.param({"input": [{"type": "computer_call_output"}]}, "computer_call_output", id="unknown item"),
    pytest.param({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file",
                 id="input_file"),
    pytest.param({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "image_url",
                 id="image by file_id"),
    pytest.param({"input": [{"type": "function_call", "name": "f"}]}, "call_id", id="call without call_id"),
    pytest.param({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name", id="tool without a name"),
    pytest.param({"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "web_search"}},
                 "tool_choice", id="hosted tool_choice"),
    pytest.param({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", id="max_output_tokens 0"),
    pytest.param({"input": "hi", "temperature": "hot"}, "temperature", id="temperature a string"),
    pytest.param({"input": "hi", "text": {"format": {"type": "json_schema"}}}, "schema", id="json_schema without schema"),
    pytest.param({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format", id="unknown format"),
    pytest.param({"input": "hi", "reasoning": {"effort": "huge"}}, "reasoning.effort", id="unknown effort"),
])
def test_what_cannot_be_translated_is_a_bad_request_naming_it(body: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest, match=named.replace("[", r"\[").replace("]", r"\]")):
        chat_from_responses(body, "llamacpp")


# ----- the event stream -----------------------------------------------------------------------------

def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def call(index: int, arguments: str, **first: Any) -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if first:
        fragment.update(id=first["id"], type="function")
        fragment["function"]["name"] = first["name"]
    return chunk({"tool_calls": [fragment]})


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}
MIXED = sse(chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Think "}),
            chunk({"reasoning_content": "twice."}), chunk({"content": "Héllo"}), chunk({"content": " 世界"}),
            call(0, "", id="call_a", name="weather"), call(0, '{"city":'), call(0, '"Oslo"}'),
            call(1, "{}", id="call_b", name="time"), chunk({}, "tool_calls"), USAGE, "[DONE]")


def events_of(stream: bytes) -> list[dict[str, Any]]:
    """Parse Responses SSE bytes; check the framing of each event on the way."""
    assert stream.endswith(b"\n\n")
    events = []
    for block in stream[:-2].split(b"\n\n"):
        event_line, data_line = block.split(b"\n")
        event = json.loads(data_line.removeprefix(b"data: "))
        assert event_line == b"event: " + event["type"].encode()
        events.append(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


def run(pieces: list[bytes], *, gather: bool = False, **body: Any) -> tuple[bytes, ResponsesEvents]:
    transform = ResponsesEvents(response_skeleton({"input": "hi", **body}, response_id="resp_1", created_at=1700000000,
                                                  model="smol"), model_name="m", gather=gather)
    out = b"".join(transform.feed(piece) for piece in pieces) + transform.flush()
    return out, transform


def test_a_stream_gives_the_event_sequence_item_by_item() -> None:
    out, _ = run([MIXED])
    events = events_of(out)
    assert [event["type"] for event in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    text = [event for event in events if event["type"] == "response.output_text.done"][0]
    assert text == {"type": "response.output_text.done", "sequence_number": 13, "item_id": "msg_1_1",
                    "output_index": 1, "content_index": 0, "text": "Héllo 世界", "logprobs": []}
    arguments = [event for event in events if event["type"] == "response.function_call_arguments.done"]
    assert [(event["name"], event["arguments"], event["output_index"]) for event in arguments] == [
        ("weather", '{"city":"Oslo"}', 2), ("time", "{}", 3)]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["model"] == "smol" and final["id"] == "resp_1"
    assert final["usage"] == {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12}
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "function_call", "function_call"]
    assert final["output"][2] == {"id": "fc_1_2", "type": "function_call", "status": "completed", "call_id": "call_a",
                                  "name": "weather", "arguments": '{"city":"Oslo"}'}


def test_each_done_item_is_the_item_its_deltas_built() -> None:
    events = events_of(run([MIXED])[0])
    built: dict[int, str] = {}
    for event in events:
        if event["type"] in ("response.output_text.delta", "response.reasoning_text.delta",
                             "response.function_call_arguments.delta"):
            built[event["output_index"]] = built.get(event["output_index"], "") + event["delta"]
    done = {event["output_index"]: event["item"] for event in events if event["type"] == "response.output_item.done"}
    assert built == {index: item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"]
                     for index, item in done.items()}
    assert list(done.values()) == events[-1]["response"]["output"]


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(MIXED)), max_size=40), crlf=st.booleans())
def test_the_events_are_identical_however_the_backends_stream_is_split(cuts: list[int], crlf: bool) -> None:
    stream = MIXED.replace(b"\n", b"\r\n") if crlf else MIXED
    cuts = [cut * len(stream) // len(MIXED) for cut in cuts]
    assert run(split_at(stream, cuts))[0] == run([MIXED])[0]


TEXTS = st.lists(st.text(max_size=8), max_size=20)


@given(texts=TEXTS, reasoning=st.lists(st.text(min_size=1, max_size=8), max_size=5),
       cut_fractions=st.lists(st.floats(min_value=0, max_value=1), max_size=20))
def test_streamed_text_is_exactly_the_backends_deltas(texts: list[str], reasoning: list[str],
                                                      cut_fractions: list[float]) -> None:
    stream = sse(*[chunk({"reasoning_content": piece}) for piece in reasoning],
                 *[chunk({"content": text}) for text in texts], chunk({}, "stop"), "[DONE]")
    out, _ = run(split_at(stream, [int(fraction * len(stream)) for fraction in cut_fractions]))
    events = events_of(out)
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    assert deltas == "".join(texts)
    kinds = [item["type"] for item in events[-1]["response"]["output"]]
    assert kinds == (["reasoning"] if reasoning else []) + (["message"] if "".join(texts) else [])


def test_a_length_cut_is_incomplete_with_its_reason() -> None:
    out, _ = run([sse(chunk({"content": "Once"}), chunk({}, "length"), USAGE, "[DONE]")], max_output_tokens=16)
    events = events_of(out)
    assert events[-1]["type"] == "response.incomplete"
    response = events[-1]["response"]
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete" and response["max_output_tokens"] == 16


def test_an_empty_answer_still_completes() -> None:
    events = events_of(run([sse("[DONE]")])[0])
    assert [event["type"] for event in events] == ["response.created", "response.in_progress", "response.completed"]
    assert events[-1]["response"]["output"] == []


def test_tabbyapi_whole_calls_and_llamacpp_timings() -> None:
    whole = {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"id": "call_t", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        "finish_reason": "tool_calls"}], "timings": {"prompt_n": 9, "predicted_n": 4, "cache_n": 6}}
    out, _ = run([sse(chunk({"content": "Sure."}), whole, "[DONE]")])
    response = events_of(out)[-1]["response"]
    assert response["output"][1]["arguments"] == '{"x": 1}' and response["output"][1]["call_id"] == "call_t"
    assert response["usage"]["input_tokens"] == 9 and response["usage"]["output_tokens"] == 4
    assert response["usage"]["input_tokens_details"] == {"cached_tokens": 6}


def test_a_gathered_answer_is_the_completed_response_and_nothing_streams() -> None:
    out, transform = run([MIXED], gather=True)
    assert out == b""
    answer = transform.answer()
    assert answer == events_of(run([MIXED])[0])[-1]["response"]


def test_an_in_band_error_raises_after_the_events_before_it() -> None:
    transform = ResponsesEvents(response_skeleton({"input": "hi"}, response_id="resp_1", created_at=1, model="smol"),
                                model_name="m")
    first = transform.feed(sse(chunk({"content": "Hel"}), {"error": {"message": "boom"}}))
    assert [event["type"] for event in events_of(first)][-1] == "response.output_text.delta"
    with pytest.raises(UpstreamError, match="m: boom"):
        transform.feed(b"")
    failed = events_of(first + transform.failed_event(UpstreamError(502, "m: boom")))[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed" and failed["response"]["error"] == {"code": "upstream_error",
                                                                                        "message": "m: boom"}
    assert failed["response"]["output"][0]["status"] == "incomplete"


def test_an_error_as_the_last_event_still_ends_with_response_failed() -> None:
    transform = ResponsesEvents(response_skeleton({"input": "hi"}, response_id="resp_1", created_at=1, model="smol"),
                                model_name="m")
    out = transform.feed(sse(chunk({"content": "Hel"})) + b'data: {"error": {"message": "boom"}}')
    with pytest.raises(UpstreamError) as raised:  # the relay then asks for the in-band failure
        transform.flush()
    out += transform.failed_event(raised.value)
    assert [event["type"] for event in events_of(out)][-2:] == ["response.output_text.delta", "response.failed"]


def test_more_of_a_tool_call_after_another_began_is_a_backend_error() -> None:
    with pytest.raises(UpstreamError, match="tool call 'a'"):
        run([sse(call(0, "{", id="x", name="a"), call(1, "{}", id="y", name="b"), call(0, "}"), "[DONE]")])


# ----- the route, in-process ------------------------------------------------------------------------

def test_the_route_streams_events_and_releases_its_lease(setup: Any) -> None:
    client, upstream, manager = setup
    upstream.script = (200, "text/event-stream", [MIXED[i:i + 7] for i in range(0, len(MIXED), 7)])
    answer = client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True, "keep_alive": "1m"},
                         headers=AUTH)
    assert answer.status_code == 200 and answer.content_type.startswith("text/event-stream")
    events = events_of(answer.data)
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["model"] == "m"
    path, sent = upstream.sent[-1]
    assert path == "/v1/chat/completions" and sent["model"] == "back-id" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True} and "keep_alive" not in sent
    assert leases(manager) == 0 and upstream.responses[-1].closed


def test_the_route_answers_a_response_object_without_stream(setup: Any) -> None:
    client, upstream, manager = setup
    upstream.script = (200, "text/event-stream", [MIXED])
    answer = client.post("/v1/responses", json={"model": "m", "input": "hi"}, headers=AUTH)
    body = answer.get_json()
    assert body["object"] == "response" and body["status"] == "completed" and body["id"].startswith("resp_")
    assert body["output"][1]["content"][0]["text"] == "Héllo 世界" and body["usage"]["total_tokens"] == 12
    assert leases(manager) == 0


def test_a_stream_that_breaks_off_ends_with_response_failed(setup: Any) -> None:
    client, upstream, manager = setup
    upstream.script = (200, "text/event-stream", [sse(chunk({"content": "Hel"})), sse({"error": {"message": "boom"}})])
    answer = client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True}, headers=AUTH)
    events = events_of(answer.data)
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["message"] == "m: boom"
    assert leases(manager) == 0


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model": "m", "input": "hi", "previous_response_id": "resp_1"}, 400, "invalid_request"),
    ({"model": "nope", "input": "hi"}, 404, "model_not_found"),
    ({"model": "m", "input": "hi", "stream": "yes"}, 400, "invalid_request"),
])
def test_errors_are_in_openais_shape_and_take_no_lease(setup: Any, body: dict[str, Any], status: int, code: str) -> None:
    client, upstream, manager = setup
    answer = client.post("/v1/responses", json=body, headers=AUTH)
    assert answer.status_code == status
    error = answer.get_json()["error"]
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "code", "param"}
    assert upstream.sent == [] and leases(manager) == 0


def test_a_backend_error_status_keeps_its_status_in_openais_shape(setup: Any) -> None:
    client, upstream, manager = setup
    upstream.script = (400, "application/json", [json.dumps({"error": {"message": "context too long"}}).encode()])
    answer = client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True}, headers=AUTH)
    assert answer.status_code == 400 and answer.get_json()["error"]["message"] == "context too long"
    assert leases(manager) == 0


def test_stored_responses_cannot_be_read(setup: Any) -> None:
    client, _, _ = setup
    answer = client.get("/v1/responses/resp_1", headers=AUTH)
    assert answer.status_code == 400 and "stateless" in answer.get_json()["error"]["message"]
    assert client.post("/v1/responses", json={"input": "hi"}).status_code == 401  # the key is checked


# ----- the official SDK against the fake backend ---------------------------------------------------

def sdk(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def recorded(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The bodies the fake backend received (its --record list), oldest first."""
    return [entry["body"] for entry in upstream_requests(proxy, "fake")]


@pytest.fixture
def fake(start_proxy: Any) -> ProxyProcess:
    proxy: ProxyProcess = start_proxy({"fake": fake_profile("--record", "--reasoning", "2", "--tool-call", "get_weather")})
    return proxy


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city"]}}


def test_sdk_create_gives_text_reasoning_and_usage(fake: ProxyProcess) -> None:
    response = sdk(fake).responses.create(model="fake", input="Say hello.", instructions="Be brief.",
                                          max_output_tokens=50, temperature=0)
    assert response.status == "completed" and response.model == "fake" and response.object == "response"
    assert response.output_text == "tok0 tok1 tok2 tok3 tok4 "
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.usage is not None and response.usage.input_tokens == 3 and response.usage.output_tokens == 5
    sent = recorded(fake)[-1]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0


def test_sdk_stream_iterates_the_events(fake: ProxyProcess) -> None:
    with sdk(fake).responses.create(model="fake", input="Say hello.", stream=True) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == \
        "tok0 tok1 tok2 tok3 tok4 "
    assert "".join(event.delta for event in events if event.type == "response.reasoning_text.delta") == "think0 think1 "
    completed = events[-1]
    assert completed.type == "response.completed" and completed.response.output_text == "tok0 tok1 tok2 tok3 tok4 "


def test_sdk_stream_helper_accumulates_the_final_response(fake: ProxyProcess) -> None:
    # responses.stream() checks identities and order strictly (items added before their deltas, done as added).
    with sdk(fake).responses.stream(model="fake", input="Weather in Tokyo?", tools=[WEATHER]) as stream:
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Tokyo", "days": 2})]


def test_sdk_function_call_round_trip(fake: ProxyProcess) -> None:
    client = sdk(fake)
    first = client.responses.create(model="fake", input=[{"role": "user", "content": "Weather in Tokyo?"}],
                                    tools=[WEATHER], tool_choice="auto")
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Tokyo", "days": 2}
    assert call.call_id == "call_fake0" and call.status == "completed"
    sent = recorded(fake)[-1]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER["parameters"]}}]
    assert sent["tool_choice"] == "auto"

    history: list[Any] = [{"role": "user", "content": "Weather in Tokyo?"}, *first.output,
                          {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}]
    second = client.responses.create(model="fake", input=history, tools=[WEATHER], stream=True)
    kinds = [event.type for event in second]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    messages = recorded(fake)[-1]["messages"]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_fake0", "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_fake0", "content": '{"sky": "clear"}'}


def test_sdk_json_schema_goes_to_llamacpps_response_format(fake: ProxyProcess) -> None:
    sdk(fake).responses.create(model="fake", input="Is it ok?", text={"format": {
        "type": "json_schema", "name": "verdict", "schema": SCHEMA, "strict": True}}, reasoning={"effort": "low"})
    sent = recorded(fake)[-1]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA,
                                                                              "strict": True}}
    assert sent["reasoning_effort"] == "low" and sent["chat_template_kwargs"] == {"enable_thinking": True}


def test_sdk_errors_raise_the_sdks_exceptions(fake: ProxyProcess) -> None:
    client = sdk(fake)
    with pytest.raises(openai.BadRequestError, match="stateless"):
        client.responses.create(model="fake", input="hi", previous_response_id="resp_123")
    with pytest.raises(openai.NotFoundError, match="configured models: fake"):
        client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=fake.url + "/v1", api_key="wrong", max_retries=0).responses.create(model="fake", input="hi")


def codex_like_tools(count: int = 9, description_kb: int = 4) -> list[dict[str, Any]]:
    """About count * description_kb KiB of function tools, as Codex CLI sends, plus tools the backend cannot run."""
    tools: list[dict[str, Any]] = [{
        "type": "function", "name": f"tool_{number}", "description": f"Tool {number}. " + "Details. " * (description_kb * 110),
        "strict": False, "parameters": {"type": "object", "additionalProperties": False,
                                        "properties": {"command": {"type": "array", "items": {"type": "string"}},
                                                       "workdir": {"type": "string"}, "timeout_ms": {"type": "number"}},
                                        "required": ["command"]}} for number in range(count)]
    return tools + [{"type": "web_search"}, {"type": "custom", "name": "apply_patch", "description": "patch",
                                            "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}]


def test_a_codex_sized_request_with_many_tools_works(fake: ProxyProcess) -> None:
    tools = codex_like_tools()
    assert len(json.dumps(tools)) > 36_000
    with sdk(fake).responses.create(
            model="fake", instructions="You are a coding agent.", stream=True, tools=tools,
            tool_choice="auto", parallel_tool_calls=False, store=False, reasoning={"effort": "medium", "summary": "auto"},
            include=["reasoning.encrypted_content"], prompt_cache_key="session-1",
            input=[{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions/>"}]},
                   {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<env/>"},
                                                                   {"type": "input_text", "text": "List the files."}]}]) as stream:
        events = list(stream)
    assert events[-1].type == "response.completed"
    sent = recorded(fake)[-1]
    assert [tool["function"]["name"] for tool in sent["tools"]] == [f"tool_{number}" for number in range(9)]
    assert sent["tools"][8]["function"]["description"] == tools[8]["description"]
    assert sent["messages"][0] == {"role": "system", "content": "You are a coding agent.\n\n<permissions/>"}


# ----- the official SDK against real SmolLM2 ---------------------------------------------------------

@pytest.fixture(scope="module")
def smol(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    from tests.conftest import free_port, write_config

    config = write_config(tmp_path_factory.mktemp("responses"), {"smol": llamacpp_profile(gguf)})
    proxy = ProxyProcess(config, free_port())
    try:
        proxy.wait_healthy()
        yield proxy
    finally:
        proxy.stop()
        assert not proxy.kill_leftovers()


def test_smollm2_answers_create_and_stream_alike(smol: ProxyProcess) -> None:
    client = sdk(smol)
    whole = client.responses.create(model="smol", input="Name a colour.", temperature=0, max_output_tokens=12)
    assert whole.status in ("completed", "incomplete") and whole.output_text.strip()
    assert whole.model == "smol" and whole.usage is not None and whole.usage.input_tokens > 0
    assert whole.usage.output_tokens > 0
    with client.responses.create(model="smol", input="Name a colour.", temperature=0, max_output_tokens=12,
                                 stream=True) as stream:
        events = list(stream)
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed == whole.output_text
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_smollm2_follows_a_json_schema(smol: ProxyProcess) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    response = sdk(smol).responses.create(model="smol", input="Is the sky blue? Answer in JSON.", temperature=0,
                                          max_output_tokens=20,
                                          text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert isinstance(json.loads(response.output_text)["ok"], bool)


def test_smollm2_takes_a_function_call_output_turn(smol: ProxyProcess) -> None:
    response = sdk(smol).responses.create(model="smol", temperature=0, max_output_tokens=12, tools=[WEATHER],
                                          input=[{"role": "user", "content": "Weather in Oslo?"},
                                                 {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                                                  "arguments": '{"city": "Oslo"}'},
                                                 {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 20 C"}])
    assert response.status in ("completed", "incomplete") and response.output


# ----- Codex CLI ------------------------------------------------------------------------------------

CODEX_VERSION = "0.169.0"
CODEX_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "model-proxy" / "codex"


def missing(reason: str) -> None:
    """Skip with the reason, except in CI, where a missing client fails the test."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def codex() -> Path:
    """Codex CLI from npm, installed once into a cache folder (PROXY_CODEX names one already there).

    Installing needs the npm registry; running it needs nothing beyond loopback."""
    given = os.environ.get("PROXY_CODEX")
    binary = Path(given) if given else CODEX_CACHE / "node_modules" / ".bin" / "codex"
    if not binary.is_file():
        if given:
            pytest.fail(f"PROXY_CODEX={given} is not a file")
        if shutil.which("npm") is None or shutil.which("node") is None:
            missing("Codex CLI test: node and npm are not installed")
        CODEX_CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CODEX_CACHE),
                               f"@openai/codex@{CODEX_VERSION}"], capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not binary.is_file():
            missing(f"Codex CLI test: npm install @openai/codex@{CODEX_VERSION} failed (offline?): {done.stderr[-500:]}")
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        missing(f"Codex CLI test: {binary} does not run here: {version.stderr[-500:]}")
    return binary


def test_codex_exec_answers_through_the_proxy(codex: Path, start_proxy: Any, tmp_path: Path) -> None:
    proxy = start_proxy({"fake": fake_profile("--record")})
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(f'''model = "fake"
model_provider = "proxy"

[model_providers.proxy]
name = "model-proxy"
base_url = "{proxy.url}/v1"
wire_api = "responses"
env_key = "PROXY_API_KEY"
''')
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "CODEX_HOME": str(home), "PROXY_API_KEY": API_KEY}
    done = subprocess.run([str(codex), "exec", "--skip-git-repo-check", "-s", "read-only", "Say hello."], cwd=work,
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"codex exec failed ({done.returncode}):\n{done.stderr[-3000:]}\n{proxy.log()[-2000:]}"
    assert done.stdout.strip() == "tok0 tok1 tok2 tok3 tok4"
    sent = recorded(proxy)[-1]
    assert len(sent["tools"]) >= 5 and sent["stream"] is True
    assert all(tool["type"] == "function" and tool["function"]["name"] for tool in sent["tools"])
