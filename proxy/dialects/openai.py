"""The OpenAI dialect: requests and answers pass through as they are, except the model's name.

Backends answer with their own id for the model (a folder, a file name); clients must see the name
they asked for, in every body and chunk, whichever field the backend used.
"""

from __future__ import annotations

import json

from proxy.config import ModelConfig


def renames_model(model: ModelConfig) -> bool:
    """Say whether answers need the public name put in: the backend uses another id, or TabbyAPI's
    completion chunks name the model only in `model_name` (clients read `model`)."""
    return model.upstream_model != model.name or model.backend == "tabbyapi"


def model_field_replacements(model: ModelConfig) -> list[tuple[bytes, bytes]]:
    """Return the byte patterns that rename the backend's model id in SSE chunks (compact and spaced JSON).

    TabbyAPI's completion chunks carry `"model_name": <folder>` and no `model`: that field becomes
    both, so every chunk names the model as the client knows it.
    """
    old, new = json.dumps(model.upstream_model).encode(), json.dumps(model.name).encode()
    return [(b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new),
            (b'"model_name":' + old, b'"model":' + new + b',"model_name":' + new),
            (b'"model_name": ' + old, b'"model": ' + new + b', "model_name": ' + new)]


def renamed(body: bytes, name: str) -> bytes:
    """Return a JSON answer with `model` (and TabbyAPI's `model_name`) set to the name the client knows."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    if isinstance(answer, dict) and ("model" in answer or "model_name" in answer):
        answer["model"] = name
        if "model_name" in answer:
            answer["model_name"] = name
        return json.dumps(answer).encode()
    return body
