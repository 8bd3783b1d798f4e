"""Profile templates merged into requests, and pipeline.prepare: model, keep_alive, validation."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from proxy.config import Config, Template, load_config
from proxy.errors import BadRequest, UnknownModel
from proxy.pipeline import prepare
from proxy.template import apply_template, messages_with_system
from tests.conftest import fake_profile, write_config

NOW = datetime(2024, 3, 5, 14, 7, tzinfo=timezone.utc)
TIME_LINE = "Current date and time: Tuesday, 05 March 2024, 14:07 UTC"
USER = {"role": "user", "content": "Hi"}


def template(**fields: Any) -> Template:
    defaults = fields.pop("defaults", {})
    return Template(defaults=MappingProxyType(defaults), **fields)


# ---- sampler defaults -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_defaults_fill_only_keys_the_request_did_not_set(kind: str) -> None:
    body = {"model": "m", "messages": [USER], "prompt": "p", "temperature": 0.9, "stop": ["x"]}
    rules = template(defaults={"temperature": 0.2, "top_p": 0.5, "stop": ["###"], "max_tokens": 64})

    merged = apply_template(body, rules, kind, NOW)

    assert merged["temperature"] == 0.9
    assert merged["stop"] == ["x"]
    assert merged["top_p"] == 0.5
    assert merged["max_tokens"] == 64


def test_explicit_null_in_the_request_counts_as_unset() -> None:
    merged = apply_template({"prompt": "p", "temperature": None}, template(defaults={"temperature": 0.2}),
                            "completion", NOW)

    assert merged["temperature"] == 0.2


@pytest.mark.parametrize("value", [0, 0.0, False, "", []])
def test_falsy_request_values_still_count_as_set(value: object) -> None:
    merged = apply_template({"prompt": "p", "temperature": value}, template(defaults={"temperature": 0.2}),
                            "completion", NOW)

    assert merged["temperature"] == value


def test_max_tokens_default_is_skipped_when_the_request_sends_max_completion_tokens() -> None:
    merged = apply_template({"messages": [USER], "max_completion_tokens": 10},
                            template(defaults={"max_tokens": 256}), "chat", NOW)

    assert "max_tokens" not in merged
    assert merged["max_completion_tokens"] == 10


def test_max_completion_tokens_default_is_skipped_when_the_request_sends_max_tokens() -> None:
    merged = apply_template({"messages": [USER], "max_tokens": 10},
                            template(defaults={"max_completion_tokens": 256}), "chat", NOW)

    assert "max_completion_tokens" not in merged
    assert merged["max_tokens"] == 10


def test_max_tokens_default_applies_when_max_completion_tokens_is_null() -> None:
    merged = apply_template({"messages": [USER], "max_completion_tokens": None},
                            template(defaults={"max_tokens": 256}), "chat", NOW)

    assert merged["max_tokens"] == 256


def test_embedding_requests_are_untouched() -> None:
    body = {"model": "m", "input": "text"}
    rules = template(system="Be brief.", system_time=True, defaults={"temperature": 0.2, "max_tokens": 5})

    merged = apply_template(body, rules, "embedding", NOW)

    assert merged == {"model": "m", "input": "text"}


def test_completion_requests_get_no_messages() -> None:
    merged = apply_template({"prompt": "p"}, template(system="Be brief.", system_time=True), "completion", NOW)

    assert merged == {"prompt": "p"}


def test_apply_template_does_not_mutate_the_request() -> None:
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "S"}]}, USER]}
    original = copy.deepcopy(body)

    apply_template(body, template(system_time=True, defaults={"top_k": 5}), "chat", NOW)

    assert body == original


# ---- system prompt and time -------------------------------------------------------------------


def test_system_prompt_is_inserted_first_when_the_request_has_none() -> None:
    messages = messages_with_system([USER], template(system="Be brief."), NOW)

    assert messages == [{"role": "system", "content": "Be brief."}, USER]


@pytest.mark.parametrize("role", ["system", "developer"])
def test_system_prompt_is_not_inserted_when_the_request_has_one(role: str) -> None:
    own = [USER, {"role": role, "content": "Mine."}]

    assert messages_with_system(own, template(system="Be brief."), NOW) == own


def test_no_template_system_leaves_messages_alone() -> None:
    assert messages_with_system([USER], template(), NOW) == [USER]
    assert messages_with_system([], template(), NOW) == []


def test_system_time_is_appended_to_the_clients_string_system_message() -> None:
    messages = messages_with_system(
        [{"role": "system", "content": "Mine."}, USER], template(system="Ignored.", system_time=True), NOW)

    assert messages == [{"role": "system", "content": f"Mine.\n\n{TIME_LINE}"}, USER]


def test_system_time_is_appended_to_the_clients_developer_message() -> None:
    messages = messages_with_system(
        [USER, {"role": "developer", "content": "Mine."}], template(system_time=True), NOW)

    assert messages == [USER, {"role": "developer", "content": f"Mine.\n\n{TIME_LINE}"}]


def test_system_time_is_appended_as_a_part_to_list_content() -> None:
    parts = [{"type": "text", "text": "Mine."}]

    messages = messages_with_system([{"role": "system", "content": parts}, USER], template(system_time=True), NOW)

    assert messages[0]["content"] == [{"type": "text", "text": "Mine."}, {"type": "text", "text": TIME_LINE}]
    assert messages[1] == USER


@pytest.mark.parametrize("content", ["", None])
def test_system_time_replaces_an_empty_client_system_message(content: str | None) -> None:
    messages = messages_with_system([{"role": "system", "content": content}], template(system_time=True), NOW)

    assert messages == [{"role": "system", "content": TIME_LINE}]


def test_system_time_is_appended_to_the_inserted_template_prompt() -> None:
    messages = messages_with_system([USER], template(system="Be brief.", system_time=True), NOW)

    assert messages == [{"role": "system", "content": f"Be brief.\n\n{TIME_LINE}"}, USER]


def test_system_time_alone_inserts_a_time_only_system_message() -> None:
    messages = messages_with_system([USER], template(system_time=True), NOW)

    assert messages == [{"role": "system", "content": TIME_LINE}, USER]


def test_system_time_uses_the_profiles_format() -> None:
    messages = messages_with_system([USER], template(system_time=True, system_time_format="%Y-%m-%d"), NOW)

    assert messages[0]["content"] == "Current date and time: 2024-03-05"


def test_only_the_first_system_message_gets_the_time() -> None:
    messages = messages_with_system([{"role": "system", "content": "One."}, {"role": "system", "content": "Two."}],
                                    template(system_time=True), NOW)

    assert [m["content"] for m in messages] == [f"One.\n\n{TIME_LINE}", "Two."]


@pytest.mark.parametrize("messages", [None, "hello", {"role": "user"}, [USER, "hello"], [["nested"]], 5])
def test_bad_messages_are_a_bad_request(messages: object) -> None:
    with pytest.raises(BadRequest) as caught:
        messages_with_system(messages, template(), NOW)
    assert caught.value.param == "messages"
    with pytest.raises(BadRequest):
        apply_template({"messages": messages}, template(), "chat", NOW)


# ---- pipeline.prepare -------------------------------------------------------------------------

CHAT = {"messages": [USER]}


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path, {
        "alpha": {**fake_profile(), "default": True, "aliases": ["a1"],
                  "template": {"temperature": 0.3, "system": "Be brief."}},
        "beta": {"backend": "command", "command": {"cmd": "server --port ${PORT}", "model_id": "beta-served"}},
        "gamma": {"backend": "tabbyapi", "model": {"model_name": "Gamma-7B-exl2"}},
    }))


@pytest.fixture
def no_default(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path / "nd", {"alpha": fake_profile()}))


@pytest.mark.parametrize(
    ("extra", "expected_s"),
    [
        ({"keep_alive": "5m"}, 300.0),
        ({"keep_alive": 0}, 0.0),
        ({"keep_alive": -1}, float("inf")),
        ({"options": {"keep_alive": "10s", "temperature": 1}}, 10.0),
        ({"ttl": 60}, 60.0),
        ({"ttl": 1.5}, 1.5),
        ({"keep_alive": "1m", "options": {"keep_alive": "10s"}, "ttl": 5}, 60.0),
        ({"options": {"keep_alive": "10s"}, "ttl": 5}, 10.0),
        ({}, None),
        ({"keep_alive": None}, None),
    ],
)
def test_prepare_removes_keep_alive_and_returns_it_in_seconds(
    config: Config, extra: dict[str, Any], expected_s: float | None
) -> None:
    request = {"model": "alpha", **CHAT, **copy.deepcopy(extra)}
    before = copy.deepcopy(request)

    prepared = prepare(config, request, "chat", now=NOW)

    assert prepared.keep_alive_s == expected_s
    assert "keep_alive" not in prepared.body
    assert "ttl" not in prepared.body
    assert "keep_alive" not in prepared.body.get("options", {})
    assert request == before  # the caller's body is not changed


def test_prepare_keeps_the_other_options(config: Config) -> None:
    prepared = prepare(config, {"model": "alpha", **CHAT, "options": {"keep_alive": 5, "temperature": 1}},
                       "chat", now=NOW)

    assert prepared.body["options"] == {"temperature": 1}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"keep_alive": "soon"}, "keep_alive"),
        ({"keep_alive": "300"}, "keep_alive"),
        ({"keep_alive": True}, "keep_alive"),
        ({"options": {"keep_alive": []}}, "options.keep_alive"),
        ({"ttl": "5m"}, "ttl"),
        ({"ttl": True}, "ttl"),
    ],
)
def test_prepare_rejects_a_bad_keep_alive(config: Config, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        prepare(config, {"model": "alpha", **CHAT, **extra}, "chat", now=NOW)
    assert caught.value.status == 400
    assert caught.value.param == param


@pytest.mark.parametrize("request_model", [None, ""])
def test_prepare_without_model_uses_the_default_profile(config: Config, request_model: str | None) -> None:
    body: dict[str, Any] = {**CHAT} if request_model is None else {"model": request_model, **CHAT}

    prepared = prepare(config, body, "chat", now=NOW)

    assert prepared.model.name == "alpha"
    assert prepared.body["model"] == "alpha"


def test_prepare_without_model_or_default_profile_is_a_bad_request(no_default: Config) -> None:
    with pytest.raises(BadRequest) as caught:
        prepare(no_default, dict(CHAT), "chat", now=NOW)
    assert caught.value.status == 400
    assert caught.value.param == "model"


def test_prepare_unknown_model_is_404_listing_configured_names(config: Config) -> None:
    with pytest.raises(UnknownModel) as caught:
        prepare(config, {"model": "nope", **CHAT}, "chat", now=NOW)

    assert caught.value.status == 404
    assert "'nope'" in caught.value.message
    for name in ("alpha", "a1", "beta", "gamma"):
        assert name in caught.value.message


@pytest.mark.parametrize("body", [None, [], ["model"], "text", 5, True])
def test_prepare_non_object_body_is_a_bad_request(config: Config, body: object) -> None:
    with pytest.raises(BadRequest) as caught:
        prepare(config, body, "chat", now=NOW)
    assert caught.value.status == 400


@pytest.mark.parametrize("model", ["al\x00pha", "a" * 257, "x" * 10_000, 5, ["alpha"], {"name": "alpha"}])
def test_prepare_invalid_model_name_is_a_bad_request(config: Config, model: object) -> None:
    with pytest.raises(BadRequest) as caught:
        prepare(config, {"model": model, **CHAT}, "chat", now=NOW)
    assert caught.value.status == 400
    assert caught.value.param == "model"


def test_prepare_256_character_model_name_is_looked_up(config: Config) -> None:
    with pytest.raises(UnknownModel):
        prepare(config, {"model": "a" * 256, **CHAT}, "chat", now=NOW)


@pytest.mark.parametrize("stream", ["true", 1, 0, {}, []])
def test_prepare_non_bool_stream_is_a_bad_request(config: Config, stream: object) -> None:
    with pytest.raises(BadRequest) as caught:
        prepare(config, {"model": "alpha", **CHAT, "stream": stream}, "chat", now=NOW)
    assert caught.value.param == "stream"


@pytest.mark.parametrize(("kind", "stream", "expected"), [("chat", True, True), ("chat", False, False),
                                                          ("completion", True, True), ("embedding", True, False)])
def test_prepare_reports_streaming(config: Config, kind: str, stream: bool, expected: bool) -> None:
    body = {"model": "alpha", "messages": [USER], "prompt": "p", "input": "i", "stream": stream}

    assert prepare(config, body, kind, now=NOW).stream is expected


@pytest.mark.parametrize(("kind", "missing"), [("chat", "messages"), ("completion", "prompt"), ("embedding", "input")])
def test_prepare_requires_the_kinds_payload(config: Config, kind: str, missing: str) -> None:
    body = {"model": "alpha", "messages": [USER], "prompt": "p", "input": "i"}
    del body[missing]

    with pytest.raises(BadRequest) as caught:
        prepare(config, body, kind, now=NOW)
    assert caught.value.param == missing


@pytest.mark.parametrize(("requested", "profile", "upstream"),
                         [("alpha", "alpha", "alpha"), ("A1", "alpha", "alpha"), ("alpha:latest", "alpha", "alpha"),
                          ("beta", "beta", "beta-served"), ("gamma", "gamma", "Gamma-7B-exl2")])
def test_prepare_forwards_the_backends_model_id(config: Config, requested: str, profile: str, upstream: str) -> None:
    prepared = prepare(config, {"model": requested, **CHAT}, "chat", now=NOW)

    assert prepared.model.name == profile
    assert prepared.body["model"] == upstream


def test_prepare_applies_the_profiles_template(config: Config) -> None:
    prepared = prepare(config, {"model": "alpha", **CHAT, "max_tokens": 3}, "chat", now=NOW)

    assert prepared.body == {
        "model": "alpha",
        "messages": [{"role": "system", "content": "Be brief."}, USER],
        "max_tokens": 3,
        "temperature": 0.3,
    }
