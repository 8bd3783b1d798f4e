"""Template defaults of a profile merged into requests: system prompt, date/time, sampler settings.

Pure functions over request bodies; only keys the request did not set are filled in.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from proxy.config import Template
from proxy.errors import BadRequest

# A default for the key on the left is skipped when the request sets any key on the right.
EQUIVALENT_KEYS = {"max_tokens": ("max_completion_tokens",), "max_completion_tokens": ("max_tokens",)}
SYSTEM_ROLES = ("system", "developer")


def apply_template(body: dict[str, Any], template: Template, kind: str, now: datetime) -> dict[str, Any]:
    """Return body with the profile's defaults filled in; kind is 'chat', 'completion' or 'embedding'."""
    if kind == "embedding":
        return body
    merged = dict(body)
    for key, value in template.defaults.items():
        if merged.get(key) is None and not any(merged.get(other) is not None for other in EQUIVALENT_KEYS.get(key, ())):
            merged[key] = value
    if kind == "chat":
        merged["messages"] = messages_with_system(body.get("messages"), template, now)
    return merged


def messages_with_system(messages: Any, template: Template, now: datetime) -> list[Any]:
    """Insert the profile's system prompt when the request has none; append the time if asked."""
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise BadRequest("messages: expected a list of message objects", param="messages")
    time_line = f"Current date and time: {now.strftime(template.system_time_format)}" if template.system_time else None
    index = next((i for i, message in enumerate(messages) if message.get("role") in SYSTEM_ROLES), None)
    if index is None:
        text = "\n\n".join(part for part in (template.system, time_line) if part)
        return [{"role": "system", "content": text}, *messages] if text else list(messages)
    if time_line is None:
        return list(messages)
    system = dict(messages[index])
    content = system.get("content")
    if isinstance(content, list):
        system["content"] = [*content, {"type": "text", "text": time_line}]
    else:
        system["content"] = f"{content}\n\n{time_line}" if content else time_line
    return [*messages[:index], system, *messages[index + 1:]]
