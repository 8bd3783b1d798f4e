"""Connection reuse (CONN, CONN.backend): how many TCP connections N sequential streamed requests open,
from one keep-alive client to the proxy and from the proxy to the synthetic backend, in both streaming
dialects (OpenAI SSE on /v1/chat/completions, Ollama NDJSON on /api/chat).

The client counts its own connects (`Connection.connects`); the backend counts what it accepted
(`GET /x/connections` on bench/synthetic.py, asked over one connection kept open for it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.client import Connection, Reply
from bench.report import Metric
from bench.stats import summarize

CHAT = "/v1/chat/completions"
OLLAMA_CHAT = "/api/chat"


@dataclass(frozen=True, slots=True)
class Dialect:
    """One streaming dialect: where it is sent, the body, and how a complete answer ends."""

    name: str
    path: str
    body: dict[str, Any]
    complete: Callable[[bytes], bool]


def _sse_complete(body: bytes) -> bool:
    return body.rstrip().endswith(b"data: [DONE]")


def _ndjson_complete(body: bytes) -> bool:
    lines = body.strip().splitlines()
    try:
        return bool(lines) and json.loads(lines[-1]).get("done") is True
    except ValueError:
        return False


def dialects(model: str, chunks: int) -> tuple[Dialect, Dialect]:
    messages = [{"role": "user", "content": "Say hello."}]
    return (Dialect("openai", CHAT, {"model": model, "messages": messages, "stream": True, "max_tokens": chunks},
                    _sse_complete),
            Dialect("ollama", OLLAMA_CHAT, {"model": model, "messages": messages, "stream": True,
                                            "options": {"num_predict": chunks}}, _ndjson_complete))


def _accepted(stats: Connection) -> int:
    return int(stats.get("/x/connections").json()["accepted"])


def _send(port: int, dialect: Dialect, requests: int, stats: Connection) -> tuple[int, int, int]:
    """Send the streamed requests on one fresh client; return (client connects, backend accepts, failures)."""
    before = _accepted(stats)
    failures = 0
    with Connection(port) as client:
        for _ in range(requests):
            reply: Reply = client.post(dialect.path, dialect.body)
            if reply.status != 200 or not dialect.complete(reply.body):
                failures += 1
        connects = client.connects
    return connects, _accepted(stats) - before, failures


def measure_connections(proxy_port: int, backend_port: int, model: str, requests: int) -> list[Metric]:
    """CONN and CONN.backend: N streamed requests direct (OpenAI only) and through the proxy (both dialects)."""
    openai, ollama = dialects(model, chunks=8)
    with Connection(backend_port) as stats:
        _accepted(stats)  # opens the counting connection before the first reading, so no delta includes it
        direct = _send(backend_port, openai, requests, stats)
        proxied = {dialect.name: _send(proxy_port, dialect, requests, stats) for dialect in (openai, ollama)}
    failures = direct[2] + sum(counts[2] for counts in proxied.values())
    client_worst = max(counts[0] for counts in proxied.values())
    backend_worst = max(counts[1] for counts in proxied.values())
    per = f"per {requests} requests"

    client = Metric("CONN", f"client connections opened for {requests} sequential streamed requests on one "
                    "keep-alive client", "connections", f"1 {per}", direct=summarize([direct[0]]),
                    proxy=summarize([client_worst]), value=client_worst, value_label=f"{per}, worse dialect",
                    value_unit="connections", passed=client_worst == 1 and failures == 0)
    client.details = {"requests": requests, "failed_requests": failures,
                      "proxy_client_connections": {name: counts[0] for name, counts in proxied.items()},
                      "direct_client_connections": direct[0]}
    client.note = (f"through the proxy: OpenAI SSE {proxied['openai'][0]}, Ollama NDJSON {proxied['ollama'][0]} "
                   f"connection(s) for {requests} requests; direct (OpenAI SSE only: the synthetic backend speaks no "
                   f"Ollama) {direct[0]}; failed requests: {failures}")

    backend = Metric("CONN.backend", f"backend connections opened for {requests} sequential streamed requests",
                     "connections", f"<= 1 {per}", direct=summarize([direct[1]]), proxy=summarize([backend_worst]),
                     value=backend_worst, value_label=f"{per}, worse dialect", value_unit="connections",
                     passed=backend_worst <= 1 and failures == 0)
    backend.details = {"requests": requests,
                       "proxy_backend_connections": {name: counts[1] for name, counts in proxied.items()},
                       "direct_backend_connections": direct[1]}
    backend.note = (f"accepted by the synthetic backend while the proxy relayed them: OpenAI SSE "
                    f"{proxied['openai'][1]}, Ollama NDJSON {proxied['ollama'][1]} (0: a connection pooled "
                    f"earlier was reused); direct {direct[1]}")
    return [client, backend]
