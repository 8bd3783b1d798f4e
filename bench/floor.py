"""The stack's floor (FLOOR rows): what the proxy's own libraries cost with none of the proxy in them.

Two bare forwarders run on the same synthetic backend as P1 and P3, with the proxy's HTTP stack:
waitress serving, urllib3 sending to the backend with a pooled keep-alive connection.

  wsgi   a plain WSGI function: read the body, POST it, answer with the backend's bytes
  flask  the same as one Flask route (request context, routing, Response), as the proxy's routes are

Neither authenticates, resolves a model, applies a template, takes a lease or logs a line, so the
proxy's P1 and P3 minus these are what its own work costs. Run directly, this file serves one:

  python -m bench.floor --port P --backend B --mode wsgi|flask   (GET /health answers 200)
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.client import Connection
from bench.procs import Processes, free_port, wait_http_ok
from bench.report import Metric
from bench.sampling import CpuMeter
from bench.stack import ROOT
from bench.stats import Summary, summarize

CHAT = "/v1/chat/completions"
MODES = ("wsgi", "flask")
THREADS = 8
READ_SIZE = 16 * 1024


def serve(port: int, backend: int, mode: str) -> None:
    import urllib3
    import waitress

    pool = urllib3.HTTPConnectionPool("127.0.0.1", backend, maxsize=THREADS, retries=False)

    def post(body: bytes) -> urllib3.BaseHTTPResponse:
        return pool.urlopen("POST", CHAT, body=body, headers={"Content-Type": "application/json"},
                            preload_content=False)

    def relay(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            while data := response.read1(READ_SIZE):
                yield data
        finally:
            response.release_conn()

    def kind(response: urllib3.BaseHTTPResponse) -> str:
        return str(response.headers.get("Content-Type", "application/json"))

    app: Any
    if mode == "flask":
        from flask import Flask, Response, request

        flask_app = Flask("floor")
        flask_app.add_url_rule("/health", "health", lambda: "ok")

        @flask_app.post(CHAT)
        def chat() -> Response:
            response = post(request.get_data())
            return Response(relay(response), status=response.status, content_type=kind(response))

        app = flask_app
    else:
        def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
            if environ["REQUEST_METHOD"] == "GET":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return iter([b"ok"])
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            response = post(body)
            start_response(f"{response.status} -", [("Content-Type", kind(response))])
            return relay(response)

    waitress.serve(app, host="127.0.0.1", port=port, threads=THREADS, _quiet=True)


@dataclass(slots=True)
class _Side:
    name: str
    connection: Connection
    cpu: CpuMeter | None
    latency: list[float]
    ttft: list[float]


def _ms(seconds: list[float]) -> Summary:
    return summarize(seconds).scaled(1000.0)


def _alive(popen: subprocess.Popen[bytes]) -> bool:
    return popen.poll() is None


def measure_floor(processes: Processes, backend_port: int, proxy_port: int, proxy_pid: int, *,
                  requests: int, streams: int, small: dict[str, Any], stream: dict[str, Any]) -> list[Metric]:
    """FLOOR.P1 and FLOOR.P3 per mode: the bare forwarders beside direct and the proxy, in one loop."""
    sides = [_Side("direct", Connection(backend_port), None, [], []),
             _Side("proxy", Connection(proxy_port), CpuMeter(proxy_pid), [], [])]
    popens = []
    try:
        for mode in MODES:
            port = free_port()
            popen = processes.spawn([sys.executable, "-m", "bench.floor", "--port", str(port),
                                     "--backend", str(backend_port), "--mode", mode], name=f"floor-{mode}", cwd=ROOT)
            popens.append(popen)
            wait_http_ok(port, "/health", timeout_s=30, alive=functools.partial(_alive, popen))
            sides.append(_Side(mode, Connection(port), CpuMeter(popen.pid), [], []))
        for index in range(20):  # warm-up
            for side in sides:
                side.connection.post(CHAT, small)
        # Each process's CPU over the whole loop: it works only for its own requests (the proxy's
        # background threads included), and its work after an answer's last byte is counted too.
        cpu_at_start = {side.name: side.cpu.now_s() for side in sides if side.cpu is not None}
        for index in range(requests):
            for side in sides:
                reply = side.connection.post(CHAT, small)
                if reply.status == 200:
                    side.latency.append(reply.elapsed_s)
        cpu_ms = {side.name: (side.cpu.now_s() - cpu_at_start[side.name]) / requests * 1000.0
                  for side in sides if side.cpu is not None}
        for index in range(streams + 3):
            for side in sides:
                answer = side.connection.stream(CHAT, stream)
                if index >= 3 and answer.ok and answer.ttft_s is not None:
                    side.ttft.append(answer.ttft_s)
    finally:
        for side in sides:
            side.connection.close()
        for popen in popens:
            processes.stop(popen)
    by_name = {side.name: side for side in sides}
    direct, proxy = by_name["direct"], by_name["proxy"]
    metrics = []
    for mode in MODES:
        side = by_name[mode]
        what = "waitress + urllib3, one WSGI function" if mode == "wsgi" else "Flask on waitress + urllib3"
        rate = stream.get("x_token_rate")
        rows = (("P1", "small non-stream request", "latency"),
                ("P3", f"first token ({rate:g} tokens/s)" if rate else "first token", "ttft"))
        for key, kind, values in rows:
            floor, base, ours = (_ms(getattr(one, values)) for one in (side, direct, proxy))
            metric = Metric(f"FLOOR.{key}.{mode}", f"the stack alone ({what}, no proxy logic), added {kind}",
                            "ms", "report", direct=base, proxy=floor, value=floor.median - base.median,
                            value_label="added p50", passed=None)
            metric.details = {"proxy_added_p50_ms": ours.median - base.median,
                              "proxy_own_ms": ours.median - floor.median}
            metric.note = (f"the proxy, measured in the same loop, adds {ours.median - base.median:.2f} ms: "
                           f"{ours.median - floor.median:.2f} ms above this floor")
            if key == "P1":
                metric.details |= {"floor_cpu_ms_per_request": cpu_ms[mode],
                                   "proxy_cpu_ms_per_request": cpu_ms["proxy"]}
                metric.note += (f"; CPU per request over the loop: this floor {cpu_ms[mode]:.2f} ms, "
                                f"the proxy {cpu_ms['proxy']:.2f} ms")
            metrics.append(metric)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    args = parser.parse_args(argv)
    serve(args.port, args.backend, args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
