"""Run the proxy: python proxy.py [--config config.yml] [--host H] [--port P].

A thin script: flags, logging, config, the app on waitress, and one finally that stops every child.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from types import FrameType

import waitress

from proxy.app import create_app
from proxy.auth import load_keys
from proxy.config import ConfigError, load_config
from proxy.manager import ModelManager, ProcessLauncher
from proxy.reloader import Reloader
from proxy.supervisor import ChildRegistry

log = logging.getLogger("proxy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Model-swapping proxy for local LLM servers.")
    parser.add_argument("--config", default="config.yml", help="config file (default: config.yml)")
    parser.add_argument("--host", help="address to listen on (overrides proxy.host)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides proxy.port)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        config = load_config(args.config)
        overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
        config = dataclasses.replace(config, proxy=dataclasses.replace(config.proxy, **overrides))
        keys = load_keys(config.proxy.api_tokens_path, disabled=config.proxy.disable_auth)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    if not config.models:
        log.warning("no model profiles in %s: every request will answer 404", config.proxy.profiles_dir)
    registry = ChildRegistry(config.proxy.state_dir / "backends.json")
    registry.reap_stale(config.proxy.stop_grace_s)  # before binding: a crashed proxy's children hold ports
    launcher = ProcessLauncher(config, registry)
    manager = ModelManager(config, launcher)
    app = create_app(config, manager, keys)
    reloader = Reloader(app.extensions["proxy"], launcher)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: reloader.request())
    try:
        manager.start_reaper()
        reloader.start()
        log.info("serving %d model(s) on http://%s:%d (auth %s)", len(config.models), config.proxy.host,
                 config.proxy.port, "off" if config.proxy.disable_auth else f"on, keys in {config.proxy.api_tokens_path}")
        waitress.serve(app, host=config.proxy.host, port=config.proxy.port, threads=config.proxy.threads,
                       ident="model-proxy", send_bytes=1,
                       # > 0 lets waitress notice a client that leaves while its request waits
                       channel_request_lookahead=1)
    except KeyboardInterrupt:
        pass
    finally:
        reloader.stop()
        manager.shutdown()
        launcher.close()
    return 0


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # unwinds waitress.serve in the main thread into main()'s finally


if __name__ == "__main__":
    sys.exit(main())
