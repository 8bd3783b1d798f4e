"""Run llama.cpp's HTTP server (xllamacpp) on loopback until SIGTERM; the `llamacpp` backend's command.

A standalone script: it imports only xllamacpp, never the proxy package.
Exit status: 0 after SIGTERM/SIGINT, 1 when the server cannot start (bad model file, busy port).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-parallel", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--n-gpu-layers", type=int)
    parser.add_argument("--embedding", action="store_true")
    args = parser.parse_args(argv)

    stop = threading.Event()
    # Handlers only set the event: the main thread tears the server down outside signal context.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model_path
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.n_ctx
    params.n_parallel = args.n_parallel
    params.model_alias = {args.alias}  # without it llama.cpp reports the file path as the model id
    if args.threads:
        params.cpuparams.n_threads = args.threads
    if args.n_gpu_layers is not None:
        params.n_gpu_layers = args.n_gpu_layers
    if args.embedding:
        params.embedding = True
        params.pooling_type = 1  # mean pooling: one OpenAI-shaped vector per input
    try:
        server = xllamacpp.Server(params)
    except RuntimeError as exc:
        print(f"llamacpp_server: cannot start: {exc} (model {args.model_path!r}, port {args.port})",
              file=sys.stderr, flush=True)
        return 1
    print(f"listening {server.listening_address}", flush=True)
    while not stop.wait(3600):
        pass
    del server  # dropping the last reference stops and joins the server loop
    return 0


if __name__ == "__main__":
    sys.exit(main())
