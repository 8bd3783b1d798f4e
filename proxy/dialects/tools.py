"""Tool calls, whichever dialect carries them: functions as backends accept them, and the calls a
backend streams, assembled into whole calls with their arguments parsed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypedDict

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolCall(TypedDict):
    id: str
    function: dict[str, Any]


def backend_function(function: Mapping[str, Any]) -> dict[str, Any]:
    """Return a function definition every backend accepts: TabbyAPI answers 422 to one without a
    description or parameters, which clients often leave out, so both are filled in."""
    return {**function, "description": function.get("description") or "",
            "parameters": function.get("parameters") or dict(EMPTY_PARAMETERS)}


class ToolCallAssembler:
    """Collects a backend's tool-call fragments: llama.cpp streams them keyed by index (id and name
    first, then the arguments in pieces); TabbyAPI sends each call whole."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, fragment: Mapping[str, Any]) -> None:
        index = fragment.get("index", len(self._calls))
        call = self._calls.setdefault(int(index), {"id": "", "name": "", "arguments": ""})
        function = fragment.get("function") or {}
        call["id"] = call["id"] or str(fragment.get("id") or "")
        call["name"] += function.get("name") or ""
        arguments = function.get("arguments")
        call["arguments"] += arguments if isinstance(arguments, str) else json.dumps(arguments) if arguments else ""

    def complete(self) -> list[ToolCall]:
        """Return the calls gathered so far, arguments parsed; ValueError when they are not a JSON object."""
        calls: list[ToolCall] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                raise ValueError(f"the backend sent tool call {call['name']!r} with arguments that are not "
                                 f"JSON: {call['arguments'][:200]!r}") from None
            if not isinstance(arguments, dict):
                raise ValueError(f"the backend sent tool call {call['name']!r} with arguments that are not an object")
            calls.append({"id": call["id"] or f"call_{index}",
                          "function": {"index": index, "name": call["name"], "arguments": arguments}})
        return calls

    def take(self) -> list[ToolCall]:
        """Return the complete calls and start over (the stream sends them once)."""
        calls = self.complete()
        self._calls = {}
        return calls
