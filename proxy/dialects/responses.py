"""The OpenAI Responses dialect, requests: /v1/responses bodies as the chat completions backends speak.

Input items, instructions, function tools, tool_choice, text.format and reasoning.effort become one
chat request (the answers are responses_events.py's). Stateless: nothing is stored, so a reference to
a stored response or conversation is refused. Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.dialects.samplers import SamplerNames
from proxy.dialects.tools import backend_function
from proxy.errors import BadRequest

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


# ----- requests -------------------------------------------------------------------------------------

def refuse_stored(body: Mapping[str, Any]) -> None:
    """Raise BadRequest for what needs a stored response or conversation (this server keeps none)."""
    for field in ("previous_response_id", "conversation", "prompt"):
        if body.get(field) not in (None, ""):
            raise BadRequest(f"{field}: not supported: this server does not store responses, conversations or "
                             "prompts (it is stateless); send the whole conversation in `input`", param=field)
    if body.get("background") is True:
        raise BadRequest("background: not supported: this server does not store responses to poll later; "
                         "send stream: true instead", param="background")


def chat_messages_from_input(given: object, instructions: object) -> list[dict[str, Any]]:
    """Return chat messages for `instructions` and `input` (a string, or message and tool-call items)."""
    messages: list[dict[str, Any]] = []
    if instructions not in (None, ""):
        if not isinstance(instructions, str):
            raise BadRequest("instructions: expected a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for number, item in enumerate(given):
            _add_item(messages, item, f"input[{number}]")
    elif given is not None:
        raise BadRequest("input: expected a string or a list of items", param="input")
    if not any(message["role"] != "system" for message in messages):
        raise BadRequest("input: required (a string or a list of items with at least one message)", param="input")
    return _leading_system_merged(messages)


def _add_item(messages: list[dict[str, Any]], item: object, where: str) -> None:
    if not isinstance(item, dict):
        raise BadRequest(f"{where}: expected an object", param="input")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}", param="input")
        messages.append({"role": ROLES[role], "content": _content(item.get("content"), f"{where}.content")})
    elif kind == "function_call":
        name, call_id = item.get("name"), item.get("call_id")
        if not isinstance(name, str) or not isinstance(call_id, str):
            raise BadRequest(f"{where}: a function_call needs a name and a call_id", param="input")
        arguments = item.get("arguments", "")
        call = {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # the text before a call and the calls are one turn
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise BadRequest(f"{where}.call_id: required", param="input")
        messages.append({"role": "tool", "tool_call_id": call_id,
                         "content": _content(item.get("output", ""), f"{where}.output")})
    elif kind == "reasoning":
        pass  # a reasoning item handed back: its text was the model's own, the backend cannot take it back in
    elif kind == "item_reference":
        raise BadRequest(f"{where}: item_reference: not supported: this server does not store items (it is "
                         "stateless); send the item itself", param="input")
    else:
        raise BadRequest(f"{where}.type: {kind!r} is not supported (messages, function_call, function_call_output "
                         "and reasoning items are)", param="input")


def _content(content: object, where: str) -> str | list[dict[str, Any]]:
    """Return chat content: text parts joined into a string, or content parts when there are images."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}: expected a string or a list of content parts", param="input")
    parts: list[dict[str, Any]] = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(part, dict) and kind in TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif isinstance(part, dict) and kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal") or "")})
        elif isinstance(part, dict) and kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise BadRequest(f"{where}[{number}]: an input_image needs an image_url (a URL or a data URL); "
                                 "file_id needs stored files, which this server does not keep", param="input")
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise BadRequest(f"{where}[{number}]: content part type {kind!r} is not supported "
                             "(input_text, output_text and input_image are)", param="input")
    if all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return parts


def _leading_system_merged(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # instructions and a developer message both become system messages; many chat templates take only
    # one, and only first, so the leading ones are joined.
    count = 0
    while count < len(messages) and messages[count]["role"] == "system" and isinstance(messages[count]["content"], str):
        count += 1
    if count < 2:
        return messages
    joined = "\n\n".join(message["content"] for message in messages[:count])
    return [{"role": "system", "content": joined}, *messages[count:]]


def chat_tools_from_responses(tools: object) -> list[dict[str, Any]]:
    """Return the function tools in chat's shape. Hosted and custom tools (web_search, file_search,
    local_shell, custom, ...) need a runtime the backend does not have: they are left out."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("tools: expected a list", param="tools")
    converted = []
    for number, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"tools[{number}]: expected an object", param="tools")
        if tool.get("type") != "function":
            continue
        nested = tool.get("function")
        function: dict[str, Any] = nested if isinstance(nested, dict) else tool  # chat's shape too
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest(f"tools[{number}].name: required", param="tools")
        fields = {key: function[key] for key in ("name", "description", "parameters") if function.get(key) is not None}
        converted.append({"type": "function", "function": backend_function(fields)})
    return converted


def chat_tool_choice(choice: object, tools: list[dict[str, Any]]) -> tuple[object, list[dict[str, Any]]]:
    """Return chat's tool_choice and the tools it leaves (allowed_tools narrows them); None: unset."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice, tools
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, tools
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {tool.get("name") for tool in choice.get("tools") or [] if isinstance(tool, dict)}
        mode = choice.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise BadRequest(f'tool_choice.mode: expected "auto" or "required", got {mode!r}', param="tool_choice")
        return mode, [tool for tool in tools if tool["function"]["name"] in allowed]
    raise BadRequest(f'tool_choice: expected "auto", "none", "required", a function or allowed_tools, got {choice!r} '
                     "(hosted tools are not available on this server)", param="tool_choice")


def text_format_fields(text: object, names: SamplerNames) -> dict[str, Any]:
    """Return the backend's structured-output fields for `text.format` (text, json_object, json_schema)."""
    if text is None:
        return {}
    if not isinstance(text, dict):
        raise BadRequest("text: expected an object", param="text")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        if names == "tabbyapi":
            return {"json_schema": {"type": "object"}}
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("text.format.schema: expected a JSON schema object", param="text.format.schema")
        if names == "tabbyapi":  # TabbyAPI takes the schema itself, not OpenAI's {name, schema} wrapper
            return {"json_schema": schema}
        wrapper = {"name": fmt.get("name") or "format", "schema": schema}
        if isinstance(fmt.get("strict"), bool):
            wrapper["strict"] = fmt["strict"]
        return {"response_format": {"type": "json_schema", "json_schema": wrapper}}
    raise BadRequest(f"text.format: expected type text, json_object or json_schema, got {fmt!r}", param="text.format")


def reasoning_fields(reasoning: object, names: SamplerNames) -> dict[str, Any]:
    """Return the backend's reasoning switches for `reasoning.effort` ("none" turns thinking off)."""
    if reasoning is None:
        return {}
    if not isinstance(reasoning, dict):
        raise BadRequest("reasoning: expected an object", param="reasoning")
    effort = reasoning.get("effort")
    if effort is None:
        return {}
    if effort not in EFFORTS:
        raise BadRequest(f"reasoning.effort: expected one of {', '.join(EFFORTS)}, got {effort!r}",
                         param="reasoning.effort")
    enabled = effort != "none"
    fields: dict[str, Any] = ({"enable_thinking": enabled} if names == "tabbyapi"
                              else {"chat_template_kwargs": {"enable_thinking": enabled}})
    if enabled:  # backends know low, medium and high
        fields["reasoning_effort"] = {"minimal": "low", "xhigh": "high"}.get(effort, effort)
    return fields


def _number(body: Mapping[str, Any], field: str, *, integer: bool = False) -> int | float | None:
    value = body.get(field)
    if value is None:
        return None
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or (integer and value < 1):
        raise BadRequest(f"{field}: expected {'a positive integer' if integer else 'a number'}, got {value!r}", param=field)
    return value


def chat_from_responses(body: Mapping[str, Any], names: SamplerNames) -> dict[str, Any]:
    """Return the chat completions request for a /v1/responses body (without model and stream)."""
    refuse_stored(body)
    request: dict[str, Any] = {"messages": chat_messages_from_input(body.get("input"), body.get("instructions"))}
    choice, tools = chat_tool_choice(body.get("tool_choice"), chat_tools_from_responses(body.get("tools")))
    if tools:
        request["tools"] = tools
        if choice is not None:
            request["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            request["parallel_tool_calls"] = body["parallel_tool_calls"]
    for field, target in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        value = _number(body, field, integer=field == "max_output_tokens")
        if value is not None:
            request[target] = value
    request.update(text_format_fields(body.get("text"), names))
    request.update(reasoning_fields(body.get("reasoning"), names))
    return request
