"""What an OpenAI stream shows while its model loads: SSE comments (invisible to clients, they keep
proxies in between from timing out), or, for profiles with `load_progress: reasoning`, the progress
as reasoning deltas that chat UIs display. The text comes from the manager's status of the model.
"""

from __future__ import annotations

import json
import time

from proxy.records import ModelStatus

PROGRESS_EVERY_S = 1.0  # how often a waiting stream gets a progress frame


def progress_text(status: ModelStatus | None, waited_s: float) -> str:
    """Say how the load of a model goes: the backend's own progress, or the time so far against the
    model's last load time (an estimate), or that it waits for another model to make room."""
    if status is None:
        return f"waiting for the model ({waited_s:.0f}s)"
    name = status.name
    if status.state == "starting":
        if status.progress:  # a resident TabbyAPI load reports its modules
            return f"loading {name}: {status.progress}"
        loading = status.loading_s or 0.0
        if status.last_load_s:
            share = min(99, int(100 * loading / status.last_load_s))
            return f"loading {name}: {loading:.0f}s of about {status.last_load_s:.0f}s ({share}%)"
        return f"loading {name}: {loading:.0f}s"
    if status.state in ("stopped", "failed"):
        return f"waiting for room to load {name} ({waited_s:.0f}s): another model finishes its requests first"
    return f"waiting for {name} ({status.state}, {waited_s:.0f}s)"


def comment_frame(text: str) -> bytes:
    """An SSE comment: clients skip it, every byte of it keeps the connection busy."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def reasoning_frame(text: str, model: str, created: int | None = None) -> bytes:
    """A chat-completion chunk carrying `text` as reasoning, which chat UIs show as the model's thinking."""
    chunk = {"id": "chatcmpl-proxy-load", "object": "chat.completion.chunk",
             "created": created if created is not None else int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": text + "\n"},
                          "finish_reason": None}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
