"""Run the proxy: python proxy.py [--config config.yml] [--host H] [--port P]; manage keys with
python proxy.py keys add|list|remove|rotate; see usage and what is loaded with python proxy.py usage|status.

A thin script: flags, logging, config, the app on waitress, and one finally that drains running
answers and stops every child.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from proxy.app import create_app
from proxy.auth import add_key, list_keys, load_keys, remove_key, rotate_key
from proxy.cli import print_status, print_usage
from proxy.config import ConfigError, load_config
from proxy.footprints import Memory
from proxy.housekeeping import start_housekeeping
from proxy.launcher import ProcessLauncher
from proxy.manager import ModelManager
from proxy.nvml import Gpus
from proxy.reloader import Reloader
from proxy.request_log import open_request_log
from proxy.server import create_server
from proxy.sessions import ChildRegistry, StateDirInUse, lock_state_dir

log = logging.getLogger("proxy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Model-swapping proxy for local LLM servers.")
    parser.add_argument("--config", default="config.yml", help="config file (default: config.yml); before the command")
    parser.add_argument("--host", help="address to listen on (overrides proxy.host)")
    parser.add_argument("--port", help="port to listen on, 1-65535 (overrides proxy.port)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command")
    keys = commands.add_parser("keys", help="manage API keys in api_tokens.yml")
    actions = keys.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a named key and print it once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="the key may use admin routes (/unload, /reload)")
    add.add_argument("--rate-limit", help='requests per time, like "60/min"')
    add.add_argument("--max-concurrent", type=int, help="requests in progress at once (default: proxy.key_max_concurrent)")
    actions.add_parser("list", help="list key names (never the keys)")
    actions.add_parser("remove", help="remove a named key").add_argument("name")
    actions.add_parser("rotate", help="give a key a new value and print it once").add_argument("name")
    usage = commands.add_parser("usage", help="requests, errors, tokens and latency from the request log "
                                              "(reads it directly: no running proxy needed)")
    usage.add_argument("--since", default="7d", help="how far back: 30m, 24h, 7d, ... (default: 7d)")
    usage.add_argument("--by", default="model", choices=["key", "model", "day"], help="group by (default: model)")
    commands.add_parser("status", help="what the running proxy has loaded (asks its /status with the admin key "
                                       "from api_tokens.yml; honours --host and --port)")
    args = parser.parse_args(argv)
    if args.port is not None and not (args.port.isascii() and args.port.isdigit() and 0 < int(args.port) < 65536):
        print(f"error: --port: expected a TCP port 1-65535, got {args.port!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        if args.command == "keys":
            return manage_keys(args, config.proxy.api_tokens_path)
        if args.command == "usage":
            return print_usage(config.proxy, args.since, args.by)
        port = None if args.port is None else int(args.port)
        overrides = {key: value for key, value in (("host", args.host), ("port", port)) if value is not None}
        config = dataclasses.replace(config, proxy=dataclasses.replace(config.proxy, **overrides))
        if args.command == "status":
            return print_status(config)
        keys_loaded = load_keys(config.proxy.api_tokens_path, disabled=config.proxy.disable_auth)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    if not config.models:
        log.warning("no model profiles in %s: every request will answer 404", config.proxy.profiles_dir)
    try:  # before reaping: a live proxy's backends are not orphans
        state_lock = lock_state_dir(config.proxy.state_dir)  # held until this process exits
    except (StateDirInUse, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    registry = ChildRegistry(config.proxy.state_dir / "backends.json")
    registry.reap_stale(config.proxy.stop_grace_s)  # before binding: a crashed proxy's children hold ports
    gpus = Gpus.open()  # None without NVML (no driver, no GPU): memory is then counted only as declared
    launcher = ProcessLauncher(config, registry, gpus)
    try:  # proxy.gpus: auto needs NVML to see the GPUs
        manager = ModelManager(config, launcher, memory=Memory(gpus, config.proxy.state_dir))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    request_log = open_request_log(config.proxy)  # None when off; only a restart changes it
    app = create_app(config, manager, keys_loaded, request_log=request_log)
    reloader = Reloader(app.extensions["proxy"], launcher, overrides=overrides)  # a reload keeps --host/--port
    context = app.extensions["proxy"]
    try:  # waitress binds here: a port in use is an operator's error, not a traceback
        server = create_server(app, config.proxy, lambda: context.keys)  # keys: the ones in force after a reload
    except OSError as exc:
        print(f"error: cannot listen on {config.proxy.host}:{config.proxy.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    signal.signal(signal.SIGHUP, lambda signum, frame: reloader.request())
    try:
        start_housekeeping(manager)
        context.peers.start()  # proxy.peers: their models are read in the background, never on the request path
        reloader.start()
        threading.Thread(target=server.run, name="http", daemon=True).start()
        log.info("serving %d model(s) on http://%s:%d (auth %s)", len(config.models), config.proxy.host,
                 config.proxy.port, "off" if config.proxy.disable_auth else f"on, keys in {config.proxy.api_tokens_path}")
        if config.models:
            log.info("models: %s; default: %s", ", ".join(
                f"{name} (aliases {', '.join(model.aliases)})" if model.aliases else name
                for name, model in config.models.items()),
                config.default_model or "none (requests must name a model)")
        while not stop.wait(1.0):
            pass
    finally:
        stop_accepting(server)
        drain_s = config.proxy.drain_timeout_s
        log.info("shutting down: no new requests; waiting up to %gs for running answers", drain_s)
        if not manager.drain(drain_s):
            log.warning("answers still running after %gs (proxy.drain_timeout); stopping them", drain_s)
        reloader.stop()
        context.peers.stop()
        manager.shutdown()
        launcher.close()
        manager.memory.close()
        if request_log is not None:  # after the drain: the answers that finished are recorded too
            request_log.close()
    return 0


def stop_accepting(server: Any) -> None:
    """Close the listening socket(s) inside waitress's loop thread; open connections carry on."""
    listeners = [server] if hasattr(server, "socket") and hasattr(server, "accepting") else list(
        getattr(server, "map", {}).values())
    done = threading.Event()

    def close() -> None:
        for listener in listeners:
            if getattr(listener, "accepting", False):
                listener.accepting = False
                listener.del_channel()
                listener.socket.close()
        done.set()

    if listeners:
        listeners[0].trigger.pull_trigger(close)
        done.wait(5.0)


def manage_keys(args: argparse.Namespace, path: Path) -> int:
    """`keys add|list|remove|rotate`: edit api_tokens.yml; a running proxy picks the change up."""
    if args.action == "add":
        print(add_key(path, args.name, admin=args.admin, rate_limit=args.rate_limit, max_concurrent=args.max_concurrent))
        print(f"added key {args.name!r} to {path}; it is shown only now", file=sys.stderr)
    elif args.action == "list":
        for entry in list_keys(path):
            limit = f"  rate limit {entry.rate_limit}" if entry.rate_limit else ""
            limit += f"  at most {entry.max_concurrent} at once" if entry.max_concurrent is not None else ""
            print(f"{entry.name:<24} {'admin' if entry.admin else 'api':<6}{limit}")
    elif args.action == "remove":
        remove_key(path, args.name)
        print(f"removed key {args.name!r} from {path}", file=sys.stderr)
    elif args.action == "rotate":
        print(rotate_key(path, args.name))
        print(f"rotated key {args.name!r} in {path}; the old value no longer works", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
