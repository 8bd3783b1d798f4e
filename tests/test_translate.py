"""proxy/dialects/ (the Ollama dialect and what it shares) against the Ollama contract (ollama-api.md sections 7-15 and 17), table-driven and by property.

Pure functions, so no processes and no clocks: stream times are passed in as plain integers.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.dialects.backend import chunk_from_response, error_message_from_upstream
from proxy.dialects.ollama import (
    format_fields,
    openai_chat_from_ollama,
    openai_messages_from_ollama,
    openai_options_from_ollama,
    openai_request_from_generate,
    openai_tools_from_ollama,
    think_fields,
)
from proxy.dialects.ollama_records import OllamaStream, ollama_embeddings_from_openai, ollama_name, rfc3339_local, rfc3339_ns

CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration")

# ----- options (section 10) -------------------------------------------------------------------------

# The contract's table, written out independently of proxy/dialects/samplers.py: Ollama option -> backend field.
TABBY_FIELDS = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "typical_p": "typical", "repeat_penalty": "repetition_penalty", "repeat_last_n": "penalty_range",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat_mode", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta", "tfs_z": "tfs",
    "num_predict": "max_tokens",
}
LLAMACPP_FIELDS = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "typical_p": "typical_p", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "seed": "seed",
    "num_keep": "n_keep", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
    "num_predict": "max_tokens",
}
FIELDS = {"tabbyapi": TABBY_FIELDS, "llamacpp": LLAMACPP_FIELDS}
INTEGER_OPTIONS = {"top_k", "repeat_last_n", "seed", "num_keep", "mirostat", "num_predict"}
NUMERIC_OPTIONS = sorted(set(TABBY_FIELDS) | set(LLAMACPP_FIELDS))
RUNNER_OPTIONS = {"num_ctx": 8192, "num_batch": 512, "num_gpu": 99, "main_gpu": 0, "use_mmap": True,
                  "num_thread": 8, "numa": False, "low_vram": False, "use_mlock": False, "vocab_only": False,
                  "logits_all": False, "embedding_only": False, "penalize_newline": True, "draft_num_predict": 4}


@pytest.mark.parametrize(
    ("options", "tabbyapi", "llamacpp"),
    [
        ({"temperature": 0.7}, {"temperature": 0.7}, {"temperature": 0.7}),
        ({"top_k": 40}, {"top_k": 40}, {"top_k": 40}),
        ({"top_p": 0.9}, {"top_p": 0.9}, {"top_p": 0.9}),
        ({"min_p": 0.05}, {"min_p": 0.05}, {"min_p": 0.05}),
        ({"typical_p": 0.95}, {"typical": 0.95}, {"typical_p": 0.95}),
        ({"repeat_penalty": 1.1}, {"repetition_penalty": 1.1}, {"repeat_penalty": 1.1}),
        ({"repeat_penalty": 0}, {}, {}),
        ({"repeat_penalty": 0.0}, {}, {}),
        ({"repeat_last_n": 64}, {"penalty_range": 64}, {"repeat_last_n": 64}),
        ({"repeat_last_n": -1}, {"penalty_range": -1}, {"repeat_last_n": -1}),
        ({"presence_penalty": 0.5}, {"presence_penalty": 0.5}, {"presence_penalty": 0.5}),
        ({"frequency_penalty": 0.25}, {"frequency_penalty": 0.25}, {"frequency_penalty": 0.25}),
        ({"seed": 42}, {}, {"seed": 42}),
        ({"num_keep": 4}, {}, {"n_keep": 4}),
        ({"tfs_z": 0.9}, {"tfs": 0.9}, {}),
        ({"mirostat": 2}, {"mirostat_mode": 2}, {"mirostat": 2}),
        ({"mirostat_tau": 5.0, "mirostat_eta": 0.1}, {"mirostat_tau": 5.0, "mirostat_eta": 0.1},
         {"mirostat_tau": 5.0, "mirostat_eta": 0.1}),
        ({"num_predict": 128}, {"max_tokens": 128}, {"max_tokens": 128}),
        ({"num_predict": 0}, {"max_tokens": 0}, {"max_tokens": 0}),
        ({"num_predict": -1}, {}, {}),
        ({"num_predict": -2}, {}, {}),
        ({"num_ctx": 8192}, {}, {}),
        (RUNNER_OPTIONS, {}, {}),
        ({"no_such_option": "whatever", "keep_alive": "5m"}, {}, {}),
        ({"stop": ["</s>", "\n\n"]}, {"stop": ["</s>", "\n\n"]}, {"stop": ["</s>", "\n\n"]}),
        ({"stop": "</s>"}, {"stop": ["</s>"]}, {"stop": ["</s>"]}),
        ({"stop": []}, {"stop": []}, {"stop": []}),
        ({"temperature": None}, {}, {}),
        ({}, {}, {}),
    ],
)
def test_options_map_to_each_dialects_fields(options: dict[str, Any], tabbyapi: dict[str, Any],
                                             llamacpp: dict[str, Any]) -> None:
    assert openai_options_from_ollama(options, "tabbyapi") == tabbyapi
    assert openai_options_from_ollama(options, "llamacpp") == llamacpp


@pytest.mark.parametrize("dialect", ["tabbyapi", "llamacpp"])
@pytest.mark.parametrize(
    ("num_predict", "context_length", "expected"),
    [
        (100, 4096, {"max_tokens": 100}),
        (4096, 4096, {"max_tokens": 4096}),
        (100_000, 4096, {"max_tokens": 4096}),
        (100_000, None, {"max_tokens": 100_000}),
        (-1, 4096, {}),
        (-2, 4096, {}),
    ],
)
def test_num_predict_is_clamped_to_the_context(dialect: str, num_predict: int, context_length: int | None,
                                               expected: dict[str, Any]) -> None:
    assert openai_options_from_ollama({"num_predict": num_predict}, dialect, context_length) == expected  # type: ignore[arg-type]


def test_integer_options_accept_integral_floats() -> None:
    fields = openai_options_from_ollama({"top_k": 40.0, "num_predict": 64.0}, "llamacpp")
    assert fields == {"top_k": 40, "max_tokens": 64}
    assert isinstance(fields["top_k"], int) and isinstance(fields["max_tokens"], int)


@pytest.mark.parametrize("dialect", ["tabbyapi", "llamacpp"])
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", 5]}, "stop"),
        ({"stop": {"a": "b"}}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": [0.5]}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": math.inf}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": False}, "top_k"),
        ({"seed": "42"}, "seed"),
        ({"num_predict": "128"}, "num_predict"),
        ({"num_predict": 1.5}, "num_predict"),
        ({"repeat_last_n": 6.4}, "repeat_last_n"),
        ({"mirostat": True}, "mirostat"),
    ],
)
def test_wrongly_typed_option_is_a_bad_request_naming_it(dialect: str, options: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest) as caught:
        openai_options_from_ollama(options, dialect)  # type: ignore[arg-type]
    assert f'"{named}"' in caught.value.message
    assert caught.value.status == 400


def test_seed_of_a_wrong_type_is_rejected_even_where_the_dialect_drops_it() -> None:
    with pytest.raises(BadRequest, match="seed"):
        openai_options_from_ollama({"seed": "x"}, "tabbyapi")


@pytest.mark.parametrize("dialect", ["tabbyapi", "llamacpp"])
def test_no_options_give_no_fields(dialect: str) -> None:
    assert openai_options_from_ollama(None, dialect) == {}  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [[], ["temperature", 0.5], "temperature=0.5", 3, True])
def test_options_that_are_not_an_object_are_a_bad_request(options: object) -> None:
    with pytest.raises(BadRequest, match="options"):
        openai_options_from_ollama(options, "llamacpp")


def _numeric_option(key: str) -> st.SearchStrategy[int | float]:
    if key in INTEGER_OPTIONS:
        return st.integers(min_value=-(2**31), max_value=2**31)
    return st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False) | st.integers(-100, 100)


OPTION_DICTS = st.sets(st.sampled_from(NUMERIC_OPTIONS)).flatmap(
    lambda keys: st.fixed_dictionaries({key: _numeric_option(key) for key in keys}))


@given(options=OPTION_DICTS, dialect=st.sampled_from(["tabbyapi", "llamacpp"]))
def test_valid_numeric_options_only_produce_known_fields_with_unchanged_values(options: dict[str, int | float],
                                                                               dialect: str) -> None:
    fields = openai_options_from_ollama(options, dialect)  # type: ignore[arg-type]
    table = FIELDS[dialect]
    assert set(fields) <= set(table.values())
    expected = {table[key]: value for key, value in options.items()
                if key in table
                and not (key == "repeat_penalty" and value == 0)
                and not (key == "num_predict" and value < 0)}
    assert fields == expected
    for value in fields.values():
        assert isinstance(value, int | float) and not isinstance(value, bool)


# ----- messages, images, tools (sections 8, 13, 14) -------------------------------------------------

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xdb\x00C\x00" + bytes(64)
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
WEBP = b"RIFF" + struct.pack("<I", 26) + b"WEBPVP8L" + struct.pack("<I", 13) + b"\x2f\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("raw", "mime"),
    [(PNG, "image/png"), (JPEG, "image/jpeg"), (GIF, "image/gif"), (WEBP, "image/webp")],
)
def test_message_images_become_data_url_content_parts(raw: bytes, mime: str) -> None:
    encoded = b64(raw)
    messages = openai_messages_from_ollama([{"role": "user", "content": "What is this?", "images": [encoded]}])
    assert messages == [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{encoded}"}},
    ]}]


def test_several_images_keep_their_order_and_types() -> None:
    messages = openai_messages_from_ollama([{"role": "user", "content": "both", "images": [b64(GIF), b64(PNG)]}])
    urls = [part["image_url"]["url"] for part in messages[0]["content"] if part["type"] == "image_url"]
    assert urls == [f"data:image/gif;base64,{b64(GIF)}", f"data:image/png;base64,{b64(PNG)}"]


def test_a_data_url_image_passes_through_unchanged() -> None:
    url = f"data:image/png;base64,{b64(PNG)}"
    messages = openai_messages_from_ollama([{"role": "user", "content": "x", "images": [url]}])
    assert messages[0]["content"][1] == {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize("image", ["not base64 at all!", "@@@@", "iVBORw0KGgo*AAAA"])
def test_an_image_that_is_not_base64_is_a_bad_request(image: str) -> None:
    with pytest.raises(BadRequest, match=r"messages\[0\]\.images"):
        openai_messages_from_ollama([{"role": "user", "content": "x", "images": [image]}])


@pytest.mark.parametrize("images", ["iVBORw0KGgo=", [1, 2], {"a": "b"}])
def test_images_that_are_not_a_list_of_strings_are_a_bad_request(images: object) -> None:
    with pytest.raises(BadRequest):
        openai_messages_from_ollama([{"role": "user", "content": "x", "images": images}])


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be brief."}),
        ({"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}),
        ({"role": "assistant", "content": "Hello"}, {"role": "assistant", "content": "Hello"}),
        ({"role": "assistant", "content": None}, {"role": "assistant", "content": ""}),
        ({"role": "user"}, {"role": "user", "content": ""}),
        ({"role": "user", "content": "x", "images": []}, {"role": "user", "content": "x"}),
    ],
)
def test_plain_messages_keep_role_and_string_content(message: dict[str, Any], expected: dict[str, Any]) -> None:
    assert openai_messages_from_ollama([message]) == [expected]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "developer", "content": "x"}],
        [{"role": "function", "content": "x"}],
        [{"content": "no role"}],
        [{"role": "user", "content": ["parts", "are", "not", "ollama"]}],
        [{"role": "user", "content": 5}],
        ["just a string"],
        {"role": "user", "content": "not a list"},
        "hello",
    ],
)
def test_malformed_messages_are_a_bad_request(messages: object) -> None:
    with pytest.raises(BadRequest):
        openai_messages_from_ollama(messages)


def test_assistant_tool_calls_get_string_arguments_and_generated_ids() -> None:
    messages = openai_messages_from_ollama([
        {"role": "user", "content": "Weather in Tokyo and Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Tokyo", "units": {"metric": True}}}},
            {"function": {"index": 1, "name": "get_weather", "arguments": {"city": "Paris"}}},
        ]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_time", "arguments": {}}}]},
    ])
    calls = messages[1]["tool_calls"] + messages[2]["tool_calls"]
    for call in calls:
        assert set(call) == {"id", "type", "function"}
        assert call["type"] == "function"
        assert isinstance(call["id"], str) and call["id"]
        assert set(call["function"]) == {"name", "arguments"}
        assert isinstance(call["function"]["arguments"], str)
    assert [json.loads(call["function"]["arguments"]) for call in calls] == [
        {"city": "Tokyo", "units": {"metric": True}}, {"city": "Paris"}, {}]
    assert len({call["id"] for call in calls}) == 3


def test_assistant_tool_call_ids_and_string_arguments_are_kept() -> None:
    messages = openai_messages_from_ollama([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_k3x9q2ab", "function": {"name": "f", "arguments": '{"a": 1}'}}]}])
    assert messages[0]["tool_calls"] == [
        {"id": "call_k3x9q2ab", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]


@pytest.mark.parametrize("tool_calls", ["get_weather", [{"function": {"arguments": {}}}], [{"name": "f"}], [5]])
def test_malformed_tool_calls_are_a_bad_request(tool_calls: object) -> None:
    with pytest.raises(BadRequest, match="tool_calls"):
        openai_messages_from_ollama([{"role": "assistant", "content": "", "tool_calls": tool_calls}])


def _conversation_with_three_calls() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "A", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
            {"id": "B", "function": {"name": "get_time", "arguments": {}}},
            {"id": "C", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        ]},
    ]


def test_tool_results_without_ids_pair_by_name_with_the_latest_unanswered_call() -> None:
    messages = openai_messages_from_ollama(_conversation_with_three_calls() + [
        {"role": "tool", "content": "18C", "tool_name": "get_weather"},
        {"role": "tool", "content": "21C", "tool_name": "get_weather"},
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
    ])
    assert [message.get("tool_call_id") for message in messages[2:]] == ["C", "A", "B"]
    assert messages[2] == {"role": "tool", "content": "18C", "tool_call_id": "C"}


def test_tool_results_without_id_or_name_pair_with_the_latest_unanswered_call() -> None:
    messages = openai_messages_from_ollama(_conversation_with_three_calls() + [
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
        {"role": "tool", "content": "r3"},
    ])
    assert [message["tool_call_id"] for message in messages[2:]] == ["C", "B", "A"]


def test_a_tool_result_with_an_id_keeps_it_and_answers_that_call() -> None:
    messages = openai_messages_from_ollama(_conversation_with_three_calls() + [
        {"role": "tool", "content": "r", "tool_call_id": "C"},
        {"role": "tool", "content": "r", "tool_name": "get_weather"},
    ])
    assert [message["tool_call_id"] for message in messages[2:]] == ["C", "A"]


def test_tool_results_pair_with_generated_ids() -> None:
    messages = openai_messages_from_ollama([
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "done", "tool_name": "f"},
    ])
    assert messages[1]["tool_call_id"] == messages[0]["tool_calls"][0]["id"]


@pytest.mark.parametrize(
    ("tools", "expected"),
    [
        ([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}],
         [{"type": "function", "function": {"name": "get_weather", "description": "",
                                            "parameters": {"type": "object", "properties": {}}}}]),
        ([{"type": "function", "function": {"name": "f", "description": "Does f.", "parameters": {"type": "object"}}}],
         [{"type": "function", "function": {"name": "f", "description": "Does f.", "parameters": {"type": "object"}}}]),
        # Ollama accepts a function without parameters; TabbyAPI answers 422 without them.
        ([{"type": "function", "function": {"name": "now", "description": "The time."}}],
         [{"type": "function", "function": {"name": "now", "description": "The time.",
                                            "parameters": {"type": "object", "properties": {}}}}]),
        ([{"type": "function", "function": {"name": "now", "parameters": None}}],
         [{"type": "function", "function": {"name": "now", "description": "",
                                            "parameters": {"type": "object", "properties": {}}}}]),
        ([], []),
    ],
)
def test_tools_get_a_description(tools: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert openai_tools_from_ollama(tools) == expected


def test_a_null_tool_description_becomes_an_empty_string() -> None:
    # TabbyAPI validates description as str (422 otherwise); a client sending null must not break the request.
    tools = openai_tools_from_ollama([{"type": "function", "function": {"name": "f", "description": None,
                                                                        "parameters": {"type": "object"}}}])
    assert tools[0]["function"]["description"] == ""


@pytest.mark.parametrize("tools", [{"name": "f"}, "f", [5], [{"type": "function"}], [{"function": {"name": 3}}],
                                   [{"function": "f"}]])
def test_malformed_tools_are_a_bad_request(tools: object) -> None:
    with pytest.raises(BadRequest, match="tools"):
        openai_tools_from_ollama(tools)


# ----- format and think (section 13) ----------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


@pytest.mark.parametrize(
    ("fmt", "dialect", "expected"),
    [
        ("json", "tabbyapi", {"json_schema": {"type": "object"}}),
        ("json", "llamacpp", {"response_format": {"type": "json_object"}}),
        (SCHEMA, "tabbyapi", {"json_schema": SCHEMA}),
        (SCHEMA, "llamacpp", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "format", "schema": SCHEMA}}}),
        ("", "tabbyapi", {}),
        ("", "llamacpp", {}),
        (None, "tabbyapi", {}),
        (None, "llamacpp", {}),
    ],
)
def test_format_maps_as_the_contract_says(fmt: object, dialect: str, expected: dict[str, Any]) -> None:
    assert format_fields(fmt, dialect) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("dialect", ["tabbyapi", "llamacpp"])
@pytest.mark.parametrize("fmt", ["xml", "JSON", 5, True, ["json"]])
def test_other_formats_are_a_bad_request(dialect: str, fmt: object) -> None:
    with pytest.raises(BadRequest, match="format"):
        format_fields(fmt, dialect)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("think", "dialect", "expected"),
    [
        (True, "tabbyapi", {"enable_thinking": True}),
        (False, "tabbyapi", {"enable_thinking": False}),
        (True, "llamacpp", {"chat_template_kwargs": {"enable_thinking": True}}),
        (False, "llamacpp", {"chat_template_kwargs": {"enable_thinking": False}}),
        ("low", "tabbyapi", {"enable_thinking": True, "reasoning_effort": "low"}),
        ("medium", "tabbyapi", {"enable_thinking": True, "reasoning_effort": "medium"}),
        ("high", "tabbyapi", {"enable_thinking": True, "reasoning_effort": "high"}),
        ("max", "tabbyapi", {"enable_thinking": True, "reasoning_effort": "high"}),
        ("low", "llamacpp", {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "low"}),
        ("max", "llamacpp", {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high"}),
        (None, "tabbyapi", {}),
        (None, "llamacpp", {}),
    ],
)
def test_think_maps_as_the_contract_says(think: object, dialect: str, expected: dict[str, Any]) -> None:
    assert think_fields(think, dialect) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("dialect", ["tabbyapi", "llamacpp"])
@pytest.mark.parametrize("think", ["extreme", "true", "", 1, 0, ["high"]])
def test_bad_think_values_are_a_bad_request(dialect: str, think: object) -> None:
    with pytest.raises(BadRequest, match="think"):
        think_fields(think, dialect)  # type: ignore[arg-type]


# ----- whole requests (sections 7, 8) ---------------------------------------------------------------

def test_chat_request_end_to_end_for_tabbyapi() -> None:
    body = {
        "model": "qwen3:latest", "stream": True, "keep_alive": "5m",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Weather?", "images": [b64(PNG)]}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "options": {"temperature": 0.2, "seed": 7, "num_predict": 9000, "num_ctx": 8192, "stop": "</s>"},
        "format": "json", "think": "max", "logprobs": True, "top_logprobs": 3,
    }
    assert openai_chat_from_ollama(body, "tabbyapi", context_length=4096) == {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                                  {"type": "image_url",
                                                   "image_url": {"url": f"data:image/png;base64,{b64(PNG)}"}}]}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "",
                                                    "parameters": {"type": "object"}}}],
        "temperature": 0.2, "max_tokens": 4096, "stop": ["</s>"],
        "json_schema": {"type": "object"},
        "enable_thinking": True, "reasoning_effort": "high",
        "logprobs": True, "top_logprobs": 3,
    }


def test_chat_request_end_to_end_for_llamacpp() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "options": {"seed": 7, "typical_p": 0.9},
            "format": SCHEMA, "think": False}
    assert openai_chat_from_ollama(body, "llamacpp") == {
        "messages": [{"role": "user", "content": "Hi"}],
        "seed": 7, "typical_p": 0.9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": SCHEMA}},
        "chat_template_kwargs": {"enable_thinking": False},
    }


def test_chat_request_without_messages_has_an_empty_list() -> None:
    assert openai_chat_from_ollama({"model": "m"}, "llamacpp") == {"messages": []}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompt": "Why is the sky blue?"},
         ("chat", {"messages": [{"role": "user", "content": "Why is the sky blue?"}]})),
        ({"prompt": "Why?", "system": "Answer in French."},
         ("chat", {"messages": [{"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "Why?"}]})),
        ({"prompt": "Why?", "system": ""}, ("chat", {"messages": [{"role": "user", "content": "Why?"}]})),
        ({"prompt": "<|im_start|>user\nhi<|im_end|>\n", "raw": True},
         ("completion", {"prompt": "<|im_start|>user\nhi<|im_end|>\n"})),
        ({"prompt": "def add(a, b):\n", "suffix": "\n    return c\n"},
         ("completion", {"prompt": "def add(a, b):\n", "suffix": "\n    return c\n"})),
        ({"prompt": "def f(", "suffix": ")", "raw": True}, ("completion", {"prompt": "def f(", "suffix": ")"})),
        ({"prompt": "x", "raw": True, "options": {"num_predict": 16}},
         ("completion", {"prompt": "x", "max_tokens": 16})),
        ({"prompt": "x", "options": {"temperature": 0}, "format": "json"},
         ("chat", {"messages": [{"role": "user", "content": "x"}], "temperature": 0,
                   "response_format": {"type": "json_object"}})),
        ({"prompt": "x", "top_logprobs": 0}, ("chat", {"messages": [{"role": "user", "content": "x"}],
                                                       "top_logprobs": 0})),
        ({"prompt": "x", "top_logprobs": 20}, ("chat", {"messages": [{"role": "user", "content": "x"}],
                                                        "top_logprobs": 20})),
        ({"prompt": "x", "context": [1, 2, 3], "truncate": True, "shift": False},
         ("chat", {"messages": [{"role": "user", "content": "x"}]})),
    ],
)
def test_generate_becomes_chat_or_completion(body: dict[str, Any], expected: tuple[str, dict[str, Any]]) -> None:
    assert openai_request_from_generate(body, "llamacpp") == expected


def test_generate_images_become_content_parts() -> None:
    kind, request = openai_request_from_generate({"prompt": "Describe", "images": [b64(JPEG)]}, "tabbyapi")
    assert kind == "chat"
    assert request["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64(JPEG)}"}}]}]


def test_generate_with_a_template_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="template"):
        openai_request_from_generate({"prompt": "x", "template": "{{ .Prompt }}"}, "llamacpp")


@pytest.mark.parametrize("extra", [{"system": "be nice"}, {"context": [1, 2, 3]}])
def test_raw_with_system_or_context_is_a_bad_request(extra: dict[str, Any]) -> None:
    with pytest.raises(BadRequest) as caught:
        openai_request_from_generate({"prompt": "x", "raw": True, **extra}, "llamacpp")
    assert caught.value.message == "raw mode does not support template, system, or context"


@pytest.mark.parametrize("top_logprobs", [-1, 21, 100, True, 2.5, "3"])
def test_top_logprobs_outside_0_to_20_is_a_bad_request(top_logprobs: object) -> None:
    with pytest.raises(BadRequest) as caught:
        openai_request_from_generate({"prompt": "x", "top_logprobs": top_logprobs}, "llamacpp")
    assert caught.value.message == "top_logprobs must be between 0 and 20"


@pytest.mark.parametrize("body", [{"prompt": 5}, {"prompt": "x", "system": 5}, {"prompt": "x", "suffix": 5},
                                  {"prompt": "x", "options": {"top_k": "many"}}, {"prompt": "x", "format": "yaml"}])
def test_generate_with_wrong_types_is_a_bad_request(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        openai_request_from_generate(body, "tabbyapi")


# ----- streams (sections 7, 8, 9, 13) ---------------------------------------------------------------

START_NS = 5_000_000_000            # monotonic time the request arrived
LOAD_NS = 40_000_000                # 40 ms getting the model ready
STEP_NS = 10_000_000                # 10 ms between chunks
WALL_NS = 1_785_000_000_123_456_789  # 2026-07-25, some wall-clock time


def run_stream(chunks: list[dict[str, Any]], *, kind: str = "chat", think: object = None,
               model: str = "qwen3:latest") -> tuple[list[dict[str, Any]], int]:
    """Feed chunks at 10 ms steps after the load; return every record and the final monotonic time."""
    stream = OllamaStream(model=model, kind=kind, think=think, started_ns=START_NS)  # type: ignore[arg-type]
    records: list[dict[str, Any]] = []
    now = START_NS + LOAD_NS
    for number, chunk in enumerate(chunks):
        now += STEP_NS
        records += stream.feed(chunk, now, WALL_NS + number)
    end = now + STEP_NS
    records += stream.final(load_ns=LOAD_NS, now_ns=end, wall_ns=WALL_NS + len(chunks))
    return records, end


def check_records(records: list[dict[str, Any]], *, kind: str, model: str = "qwen3:latest") -> dict[str, Any]:
    """Assert what every Ollama client needs of a stream; return the done record."""
    assert records, "a stream always ends with a done record"
    for record in records:
        assert record["model"] == model
        assert CREATED_AT.match(record["created_at"]), record["created_at"]
        if kind == "chat":
            assert record["message"]["role"] == "assistant"
            assert isinstance(record["message"]["content"], str)
            assert "response" not in record
        else:
            assert isinstance(record["response"], str)
            assert "message" not in record
    assert [record["done"] for record in records] == [False] * (len(records) - 1) + [True]
    done = records[-1]
    assert done["done_reason"] in ("stop", "length")
    for name in METRICS:
        assert isinstance(done[name], int) and not isinstance(done[name], bool), name
        assert done[name] >= 1, name
    if kind == "chat":
        assert done["message"] == {"role": "assistant", "content": ""}
    else:
        assert done["response"] == ""
    if kind == "generate":  # Ollama's token context: the Vercel AI SDK rejects a done record without it
        assert done["context"] == []
    else:
        assert "context" not in done
    return done


def chat_chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1785000000, "model": "backend-id",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}


def contents(records: list[dict[str, Any]]) -> list[str]:
    return [record["message"]["content"] for record in records if not record["done"]]


LLAMACPP_TIMINGS = {"prompt_n": 26, "prompt_ms": 130.5, "prompt_per_token_ms": 5.02, "prompt_per_second": 199.2,
                    "predicted_n": 3, "predicted_ms": 23.25, "predicted_per_token_ms": 7.75,
                    "predicted_per_second": 129.0}


def test_llamacpp_stream_with_role_chunk_and_usage_chunk() -> None:
    records, end = run_stream([
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk({"content": "Hel"}),
        chat_chunk({"content": "lo"}),
        chat_chunk({"content": "!"}),
        chat_chunk({}, "stop"),
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "backend-id", "choices": [],
         "usage": {"prompt_tokens": 26, "completion_tokens": 3, "total_tokens": 29}, "timings": LLAMACPP_TIMINGS},
    ])
    done = check_records(records, kind="chat")
    assert contents(records) == ["Hel", "lo", "!"]
    assert done["done_reason"] == "stop"
    assert done["total_duration"] == end - START_NS
    assert done["load_duration"] == LOAD_NS
    assert done["prompt_eval_count"] == 26
    assert done["prompt_eval_duration"] == 130_500_000       # prompt_ms x 1e6
    assert done["eval_count"] == 3
    assert done["eval_duration"] == 23_250_000              # predicted_ms x 1e6


def test_llamacpp_counts_come_from_timings_when_there_is_no_usage() -> None:
    records, _ = run_stream([chat_chunk({"content": "a"}), chat_chunk({"content": "b"}),
                             chat_chunk({}, "stop", timings={**LLAMACPP_TIMINGS, "prompt_n": 11, "predicted_n": 2})])
    done = check_records(records, kind="chat")
    assert (done["prompt_eval_count"], done["eval_count"]) == (11, 2)
    assert (done["prompt_eval_duration"], done["eval_duration"]) == (130_500_000, 23_250_000)


def test_tabbyapi_stream_without_role_and_usage_in_the_finish_chunk() -> None:
    records, end = run_stream([
        chat_chunk({"content": "The"}),
        chat_chunk({"content": " sky"}),
        chat_chunk({"content": ""}),
        chat_chunk({"content": " is blue."}, "stop",
                   usage={"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16,
                          "prompt_time": 0.25, "completion_time": 1.5, "total_time": 1.75}),
    ])
    done = check_records(records, kind="chat")
    assert contents(records) == ["The", " sky", " is blue."]   # the empty delta makes no line
    assert done["prompt_eval_count"] == 12
    assert done["prompt_eval_duration"] == 250_000_000      # prompt_time x 1e9
    assert done["eval_count"] == 4
    assert done["eval_duration"] == 1_500_000_000           # completion_time x 1e9
    assert done["total_duration"] == end - START_NS


@pytest.mark.parametrize(("finish_reason", "done_reason"),
                         [("stop", "stop"), ("length", "length"), ("tool_calls", "stop"), (None, "stop")])
def test_done_reason_is_stop_or_length(finish_reason: str | None, done_reason: str) -> None:
    records, _ = run_stream([chat_chunk({"content": "x"}), chat_chunk({}, finish_reason)])
    assert check_records(records, kind="chat")["done_reason"] == done_reason


def test_openai_usage_null_on_every_chunk_is_harmless() -> None:
    records, _ = run_stream([chat_chunk({"content": "x"}, usage=None), chat_chunk({}, "stop", usage=None),
                             {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}])
    done = check_records(records, kind="chat")
    assert (done["prompt_eval_count"], done["eval_count"]) == (5, 1)


def test_completions_stream_gives_generate_records() -> None:
    def text_chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": "cmpl-1", "object": "text_completion", "model": "backend-id",
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]}

    records, _ = run_stream([text_chunk("def"), text_chunk(" add"), text_chunk("(a, b)", "length"),
                             {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}],
                            kind="generate", model="coder")
    done = check_records(records, kind="generate", model="coder")
    assert [record["response"] for record in records] == ["def", " add", "(a, b)", ""]
    assert done["done_reason"] == "length"
    assert (done["prompt_eval_count"], done["eval_count"]) == (7, 3)


def test_chat_stream_through_generate_gives_response_records() -> None:
    records, _ = run_stream([chat_chunk({"role": "assistant", "content": "Hi"}), chat_chunk({}, "stop")],
                            kind="generate")
    check_records(records, kind="generate")
    assert records[0]["response"] == "Hi"


def test_reasoning_becomes_thinking_with_empty_content() -> None:
    records, _ = run_stream([
        chat_chunk({"role": "assistant", "content": None, "reasoning_content": "Let me"}),
        chat_chunk({"reasoning_content": " think."}),
        chat_chunk({"content": "Blue."}),
        chat_chunk({}, "stop"),
    ])
    check_records(records, kind="chat")
    assert [record["message"] for record in records[:-1]] == [
        {"role": "assistant", "content": "", "thinking": "Let me"},
        {"role": "assistant", "content": "", "thinking": " think."},
        {"role": "assistant", "content": "Blue."},
    ]


def test_reasoning_becomes_top_level_thinking_on_generate() -> None:
    records, _ = run_stream([chat_chunk({"reasoning_content": "Hmm"}), chat_chunk({"content": "Yes"}),
                             chat_chunk({}, "stop")], kind="generate", think=True)
    check_records(records, kind="generate")
    assert records[0] == {"model": "qwen3:latest", "created_at": records[0]["created_at"], "response": "",
                          "thinking": "Hmm", "done": False}
    assert records[1]["response"] == "Yes" and "thinking" not in records[1]


@pytest.mark.parametrize("kind", ["chat", "generate"])
def test_reasoning_is_dropped_when_think_is_false(kind: str) -> None:
    records, _ = run_stream([chat_chunk({"reasoning_content": "secret"}), chat_chunk({"reasoning": "more"}),
                             chat_chunk({"content": "Answer"}), chat_chunk({}, "stop")], kind=kind, think=False)
    check_records(records, kind=kind)
    assert len(records) == 2
    assert "secret" not in json.dumps(records) and "more" not in json.dumps(records)


def tool_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if "tool_calls" in record.get("message", {})]


def test_llamacpp_tool_call_fragments_become_one_complete_record() -> None:
    records, _ = run_stream([
        chat_chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "Tok'}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'yo"}'}}]}),
        chat_chunk({}, "tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 9}, "timings": LLAMACPP_TIMINGS},
    ])
    done = check_records(records, kind="chat")
    calls = tool_records(records)
    assert len(records) == 2 and len(calls) == 1
    assert calls[0]["message"] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_abc", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}}]}
    assert done["done_reason"] == "stop"
    assert done["eval_count"] == 9


def test_interleaved_parallel_tool_call_fragments_are_kept_apart_by_index() -> None:
    records, _ = run_stream([
        chat_chunk({"tool_calls": [{"index": 0, "id": "c0", "function": {"name": "get_weather", "arguments": ""}}]}),
        chat_chunk({"tool_calls": [{"index": 1, "id": "c1", "function": {"name": "get_time", "arguments": ""}}]}),
        chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": "JST"}'}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Osaka"}'}}]}),
        chat_chunk({}, "tool_calls"),
    ])
    check_records(records, kind="chat")
    (call_record,) = tool_records(records)
    assert call_record["message"]["tool_calls"] == [
        {"id": "c0", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Osaka"}}},
        {"id": "c1", "function": {"index": 1, "name": "get_time", "arguments": {"tz": "JST"}}},
    ]


def test_tabbyapi_whole_tool_calls_at_the_end() -> None:
    records, _ = run_stream([
        chat_chunk({"content": ""}),
        chat_chunk({"tool_calls": [
            {"id": "a1b2c3d4e", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
            {"id": "f5g6h7i8j", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]}, "tool_calls", usage={"prompt_tokens": 30, "completion_tokens": 20, "prompt_time": 0.1,
                                 "completion_time": 0.4}),
    ])
    done = check_records(records, kind="chat")
    (call_record,) = tool_records(records)
    assert call_record["message"]["content"] == ""
    assert call_record["message"]["tool_calls"] == [
        {"id": "a1b2c3d4e", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}},
        {"id": "f5g6h7i8j", "function": {"index": 1, "name": "get_weather", "arguments": {"city": "Paris"}}},
    ]
    assert done["done_reason"] == "stop"
    assert (done["prompt_eval_duration"], done["eval_duration"]) == (100_000_000, 400_000_000)


def test_tool_calls_without_a_finish_reason_are_sent_before_the_done_record() -> None:
    records, _ = run_stream([chat_chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]})])
    check_records(records, kind="chat")
    (call_record,) = tool_records(records)
    assert records.index(call_record) == len(records) - 2
    call = call_record["message"]["tool_calls"][0]
    assert call["function"] == {"index": 0, "name": "f", "arguments": {}}
    assert isinstance(call["id"], str) and call["id"]


@pytest.mark.parametrize("arguments", ['{"city": "Tok', "not json", "[1, 2]", '"a string"'])
def test_tool_call_arguments_that_are_not_a_json_object_raise_value_error(arguments: str) -> None:
    with pytest.raises(ValueError, match="get_weather"):
        run_stream([chat_chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "get_weather",
                                                                                    "arguments": arguments}}]}),
                    chat_chunk({}, "tool_calls")])


def test_metrics_fall_back_to_proxy_times_and_delta_count_without_usage() -> None:
    stream = OllamaStream(model="m", kind="chat", think=None, started_ns=START_NS)
    first = START_NS + LOAD_NS + 70_000_000            # time to the first token after the load: 70 ms
    for number in range(4):
        stream.feed(chat_chunk({"content": f"t{number}"}), first + number * 5_000_000, WALL_NS)
    stream.feed(chat_chunk({}, "stop"), first + 20_000_000, WALL_NS)
    end = first + 25_000_000
    (done,) = stream.final(load_ns=LOAD_NS, now_ns=end, wall_ns=WALL_NS)
    check_records([done], kind="chat", model="m")
    assert done["total_duration"] == end - START_NS
    assert done["load_duration"] == LOAD_NS
    assert done["prompt_eval_duration"] == 70_000_000
    assert done["eval_count"] == 4
    assert done["eval_duration"] == 15_000_000          # first to last token


def test_an_empty_stream_still_ends_with_a_done_record_with_all_metrics_at_least_one() -> None:
    stream = OllamaStream(model="m", kind="generate", think=None, started_ns=START_NS)
    records = stream.final(load_ns=0, now_ns=START_NS, wall_ns=WALL_NS)
    done = check_records(records, kind="generate", model="m")
    assert len(records) == 1
    assert all(done[name] == 1 for name in METRICS)


@pytest.mark.parametrize("kind, raw, context", [
    ("generate", False, []),    # Ollama sends the token context; empty is what clients accept from us
    ("generate", True, None),   # a raw generate has none, as in Ollama
    ("chat", False, None),      # chat records never carry it
])
def test_only_a_non_raw_generate_ends_with_a_context(kind: str, raw: bool, context: list[int] | None) -> None:
    for finish in ("final", "aggregate"):
        stream = OllamaStream(model="m", kind=kind, think=None, started_ns=START_NS, raw=raw)  # type: ignore[arg-type]
        stream.feed(chat_chunk({"content": "x"}), START_NS + 1, WALL_NS)
        if finish == "final":
            done = stream.final(load_ns=1, now_ns=START_NS + 2, wall_ns=WALL_NS)[-1]
        else:
            done = stream.aggregate(load_ns=1, now_ns=START_NS + 2, wall_ns=WALL_NS)
        assert done["done"] is True
        assert done.get("context") == context, finish


def test_created_at_is_the_wall_clock_given() -> None:
    stream = OllamaStream(model="m", kind="chat", think=None, started_ns=0)
    (record,) = stream.feed(chat_chunk({"content": "x"}), 1, 1_785_000_000_000_000_007)
    assert record["created_at"] == rfc3339_ns(1_785_000_000_000_000_007)
    assert record["created_at"].endswith(".000000007Z")


def test_model_echoes_the_name_as_given() -> None:
    records, _ = run_stream([chat_chunk({"content": "x"}), chat_chunk({}, "stop")], model="Qwen3")
    check_records(records, kind="chat", model="Qwen3")


def test_aggregate_joins_content_and_thinking_with_the_metrics() -> None:
    stream = OllamaStream(model="qwen3:latest", kind="chat", think=True, started_ns=START_NS)
    chunks = [chat_chunk({"role": "assistant", "content": None, "reasoning_content": "Sky "}),
              chat_chunk({"reasoning_content": "physics."}), chat_chunk({"content": "Rayleigh "}),
              chat_chunk({"content": "scattering."}, "stop",
                         usage={"prompt_tokens": 10, "completion_tokens": 4, "prompt_time": 0.5, "completion_time": 2})]
    for number, chunk in enumerate(chunks):
        stream.feed(chunk, START_NS + LOAD_NS + number, WALL_NS)
    answer = stream.aggregate(load_ns=LOAD_NS, now_ns=START_NS + 3_000_000_000, wall_ns=WALL_NS)
    assert answer == {
        "model": "qwen3:latest", "created_at": rfc3339_ns(WALL_NS),
        "message": {"role": "assistant", "content": "Rayleigh scattering.", "thinking": "Sky physics."},
        "done": True, "done_reason": "stop", "total_duration": 3_000_000_000, "load_duration": LOAD_NS,
        "prompt_eval_count": 10, "prompt_eval_duration": 500_000_000, "eval_count": 4,
        "eval_duration": 2_000_000_000,
    }


def test_aggregate_of_a_generate_stream_has_response_and_thinking() -> None:
    stream = OllamaStream(model="m", kind="generate", think=None, started_ns=0)
    for chunk in [chat_chunk({"reasoning_content": "hm"}), chat_chunk({"content": "4"}), chat_chunk({}, "length")]:
        stream.feed(chunk, 10, WALL_NS)
    answer = stream.aggregate(load_ns=1, now_ns=20, wall_ns=WALL_NS)
    assert (answer["response"], answer["thinking"], answer["done"], answer["done_reason"]) == ("4", "hm", True, "length")
    assert "message" not in answer and all(answer[name] >= 1 for name in METRICS)


@pytest.mark.parametrize("shape", ["llamacpp fragments", "tabbyapi whole calls"])
def test_aggregate_of_a_streamed_tool_call_keeps_the_tool_calls(shape: str) -> None:
    # The non-streaming /api/chat path streams upstream, feeds every chunk, then aggregates
    # (routes/ollama.py); Continue always sends tools with stream:false.
    if shape == "llamacpp fragments":
        chunks = [chat_chunk({"tool_calls": [{"index": 0, "id": "c0", "function": {"name": "get_weather",
                                                                                   "arguments": '{"city":'}}]}),
                  chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Tokyo"}'}}]}),
                  chat_chunk({}, "tool_calls")]
    else:
        chunks = [chat_chunk({"tool_calls": [{"id": "c0", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Tokyo"}'}}]}, "tool_calls")]
    stream = OllamaStream(model="m", kind="chat", think=None, started_ns=0)
    for chunk in chunks:
        stream.feed(chunk, 10, WALL_NS)
    answer = stream.aggregate(load_ns=1, now_ns=20, wall_ns=WALL_NS)
    assert answer["message"].get("tool_calls") == [
        {"id": "c0", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}}]
    assert answer["done_reason"] == "stop"


def test_a_whole_openai_answer_reads_as_one_chunk() -> None:
    stream = OllamaStream(model="m", kind="chat", think=None, started_ns=START_NS)
    records = stream.feed(chunk_from_response({
        "id": "chatcmpl-9", "object": "chat.completion", "model": "backend-id",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "reasoning_content": "Need weather.",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
        "timings": {"prompt_n": 20, "prompt_ms": 12.0, "predicted_n": 8, "predicted_ms": 64.0},
    }), START_NS + 100_000_000, WALL_NS)
    assert [record["message"].get("tool_calls") for record in records][-1]  # streamed: the call is complete
    answer = stream.aggregate(load_ns=LOAD_NS, now_ns=START_NS + 100_000_000, wall_ns=WALL_NS)
    assert answer["message"] == {"role": "assistant", "content": "", "thinking": "Need weather.", "tool_calls": [
        {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert answer["done"] is True and answer["done_reason"] == "stop"
    assert (answer["prompt_eval_count"], answer["prompt_eval_duration"]) == (20, 12_000_000)
    assert (answer["eval_count"], answer["eval_duration"]) == (8, 64_000_000)
    assert answer["total_duration"] == 100_000_000 and answer["load_duration"] == LOAD_NS
    assert CREATED_AT.match(answer["created_at"])


def test_a_whole_completion_answer_reads_as_one_chunk() -> None:
    stream = OllamaStream(model="m", kind="generate", think=None, started_ns=0)
    records = stream.feed(chunk_from_response({"choices": [{"index": 0, "text": "42", "finish_reason": "length"}],
                                               "usage": {"prompt_tokens": 3, "completion_tokens": 1}}), 50, WALL_NS)
    assert records[0]["response"] == "42"  # a streaming client gets the text before the done record
    answer = stream.aggregate(load_ns=1, now_ns=60, wall_ns=WALL_NS)
    assert (answer["response"], answer["done_reason"], answer["prompt_eval_count"]) == ("42", "length", 3)
    assert all(isinstance(answer[name], int) and answer[name] >= 1 for name in METRICS)


DELTAS = st.lists(st.text(max_size=12), max_size=30)


@given(deltas=DELTAS, kind=st.sampled_from(["chat", "generate"]), with_role=st.booleans())
def test_streamed_content_is_exactly_the_concatenated_deltas(deltas: list[str], kind: str, with_role: bool) -> None:
    chunks = ([chat_chunk({"role": "assistant", "content": None})] if with_role else [])
    chunks += [chat_chunk({"content": delta}) for delta in deltas] + [chat_chunk({}, "stop")]
    records, _ = run_stream(chunks, kind=kind)
    check_records(records, kind=kind)
    texts = [record["message"]["content"] if kind == "chat" else record["response"] for record in records]
    assert "".join(texts) == "".join(deltas)
    assert len(records) == len([delta for delta in deltas if delta]) + 1
    assert sum(record["done"] for record in records) == 1


# ----- timestamps (section 1) -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("time_ns", "expected"),
    [
        (0, "1970-01-01T00:00:00.000000000Z"),
        (1_751_919_739_184_789_123, "2025-07-07T20:22:19.184789123Z"),
        (1_785_499_200_000_000_000, "2026-07-31T12:00:00.000000000Z"),
        (1_785_499_200_000_000_001, "2026-07-31T12:00:00.000000001Z"),
    ],
)
def test_rfc3339_ns_writes_nine_digits_and_z(time_ns: int, expected: str) -> None:
    assert rfc3339_ns(time_ns) == expected


@given(time_ns=st.integers(min_value=0, max_value=2**62))
def test_rfc3339_ns_parses_back_with_fromisoformat(time_ns: int) -> None:
    stamp = rfc3339_ns(time_ns)
    assert CREATED_AT.match(stamp)
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0)
    assert parsed == datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=time_ns // 1000)


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2024, 6, 4, 14, 38, 31, 837530, tzinfo=timezone(timedelta(hours=-7))),
         "2024-06-04T14:38:31.837530000-07:00"),
        (datetime(2026, 8, 1, 10, 0, 0, tzinfo=timezone.utc), "2026-08-01T10:00:00.000000000Z"),
        (datetime(2026, 8, 1, 10, 0, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
         "2026-08-01T10:00:00.000001000+05:30"),
        (datetime(2026, 1, 1, 0, 0, 0, 999999, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
         "2026-01-01T00:00:00.999999000-09:30"),
        (datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=14))), "2026-01-01T00:00:00.000000000+14:00"),
    ],
)
def test_rfc3339_local_writes_nine_digits_and_the_offset(moment: datetime, expected: str) -> None:
    stamp = rfc3339_local(moment)
    assert stamp == expected
    assert datetime.fromisoformat(stamp) == moment


@given(moment=st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2300, 1, 1),
                           timezones=st.sampled_from([timezone.utc] + [timezone(timedelta(minutes=minutes))
                                                                       for minutes in (-720, -420, -30, 60, 330, 765)])))
def test_rfc3339_local_parses_back_with_fromisoformat(moment: datetime) -> None:
    stamp = rfc3339_local(moment)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d)", stamp)
    parsed = datetime.fromisoformat(stamp)
    assert parsed == moment and parsed.utcoffset() == moment.utcoffset()


# ----- embeddings (section 15) ----------------------------------------------------------------------

def norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


def test_embeddings_are_ordered_by_index_and_normalised() -> None:
    response = {"object": "list", "model": "e", "data": [
        {"object": "embedding", "index": 2, "embedding": [0.0, 5.0]},
        {"object": "embedding", "index": 0, "embedding": [3.0, 4.0]},
        {"object": "embedding", "index": 1, "embedding": [1.0, 1.0, 1.0, 1.0]},
    ], "usage": {"prompt_tokens": 6, "total_tokens": 6}}
    vectors = ollama_embeddings_from_openai(response)
    assert vectors[0] == pytest.approx([0.6, 0.8], abs=1e-12)
    assert vectors[1] == pytest.approx([0.5, 0.5, 0.5, 0.5], abs=1e-12)
    assert vectors[2] == pytest.approx([0.0, 1.0], abs=1e-12)
    for vector in vectors:
        assert abs(norm(vector) - 1) < 1e-9


def test_embeddings_are_cut_to_dimensions_then_normalised() -> None:
    response = {"data": [{"index": 0, "embedding": [3.0, 4.0, 100.0, -7.0]}]}
    (vector,) = ollama_embeddings_from_openai(response, dimensions=2)
    assert vector == pytest.approx([0.6, 0.8], abs=1e-12)
    assert abs(norm(vector) - 1) < 1e-9


def test_embeddings_without_normalising_are_untouched() -> None:
    response = {"data": [{"index": 1, "embedding": [1, 2, 3]}, {"index": 0, "embedding": [3.5, -4.25]}]}
    assert ollama_embeddings_from_openai(response, normalize=False) == [[3.5, -4.25], [1.0, 2.0, 3.0]]


def test_a_zero_embedding_stays_zero() -> None:
    (vector,) = ollama_embeddings_from_openai({"data": [{"index": 0, "embedding": [0.0, 0.0, 0.0]}]})
    assert vector == [0.0, 0.0, 0.0]


def test_no_embeddings_give_an_empty_list() -> None:
    assert ollama_embeddings_from_openai({"data": []}) == []


@given(vector=st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=1, max_size=64)
       .filter(lambda values: norm(values) > 1e-3))
def test_every_nonzero_embedding_has_norm_one(vector: list[float]) -> None:
    (normalised,) = ollama_embeddings_from_openai({"data": [{"index": 0, "embedding": vector}]})
    assert abs(norm(normalised) - 1) < 1e-9


# ----- upstream errors (section 17) -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (b'{"error": {"message": "the request exceeds the available context size", "type": "exceed_context_size_error",'
         b' "code": 400}}', 400, "the request exceeds the available context size"),
        (b'{"error": "model is loading"}', 503, "model is loading"),
        (b'{"detail": "Model not loaded."}', 400, "Model not loaded."),
        (b'{"detail": [{"loc": ["body", "x"], "msg": "m", "type": "value_error"}]}', 422, "body.x: m"),
        (b'{"detail": [{"loc": ["body", "messages", 0, "role"], "msg": "field required"},'
         b' {"loc": ["body", "tools"], "msg": "bad"}]}', 422, "body.messages.0.role: field required; body.tools: bad"),
        (b"Internal Server Error", 500, "Internal Server Error"),
        (b"  upstream connect error  \n", 502, "upstream connect error"),
    ],
)
def test_upstream_error_bodies_become_a_plain_message(body: bytes, status: int, expected: str) -> None:
    assert error_message_from_upstream(body, status) == expected


@pytest.mark.parametrize("body", [b"", b"   \n", b"null", b"[]", b"{}"])
def test_an_upstream_error_without_a_message_mentions_the_status(body: bytes) -> None:
    message = error_message_from_upstream(body, 502)
    assert "502" in message and message


def test_a_long_plain_text_error_is_cut() -> None:
    assert len(error_message_from_upstream(b"x" * 10_000, 500)) <= 500


# ----- names (section 4) ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a", "a:latest"),
        ("a:7b", "a:7b"),
        ("a:latest", "a:latest"),
        ("ns/a", "ns/a:latest"),
        ("ns/a:q4", "ns/a:q4"),
        ("host:5000/a", "host:5000/a:latest"),
        ("host:5000/ns/a:7b", "host:5000/ns/a:7b"),
        ("qwen3-32b:exl3", "qwen3-32b:exl3"),
    ],
)
def test_ollama_name_always_has_a_tag(name: str, expected: str) -> None:
    assert ollama_name(name) == expected


# ----- message lists by property --------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False,
                                                                                     allow_infinity=False) | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
ARGUMENTS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)
TOOL_CALL = st.fixed_dictionaries({"function": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=10),
                                                                      "arguments": ARGUMENTS})},
                                  optional={"id": st.text(min_size=1, max_size=10)})
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "tool"]), "content": st.text(max_size=20)},
                          optional={"tool_name": st.text(max_size=8)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(max_size=20) | st.none()},
                          optional={"tool_calls": st.lists(TOOL_CALL, max_size=3)}),
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(MESSAGE, max_size=8))
def test_messages_keep_length_roles_and_tool_call_arguments(messages: list[dict[str, Any]]) -> None:
    converted = openai_messages_from_ollama(messages)
    assert len(converted) == len(messages)
    assert [message["role"] for message in converted] == [message["role"] for message in messages]
    for original, message in zip(messages, converted):
        assert message["content"] == (original["content"] or "")
        calls = original.get("tool_calls") or []
        assert len(message.get("tool_calls", [])) == len(calls)
        for call, out in zip(calls, message.get("tool_calls", [])):
            assert out["type"] == "function" and isinstance(out["id"], str) and out["id"]
            assert out["function"]["name"] == call["function"]["name"]
            assert isinstance(out["function"]["arguments"], str)
            assert json.loads(out["function"]["arguments"]) == call["function"]["arguments"]
