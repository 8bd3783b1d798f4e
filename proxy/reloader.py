"""Live reload: on SIGHUP, or when config.yml, a profile or api_tokens.yml changes on disk, read the
config again and apply it. Loaded models whose profile did not change keep running.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.app_context import ProxyContext
from proxy.auth import Keys, load_keys
from proxy.config import Config, ConfigError, load_config
from proxy.launcher import ProcessLauncher
from proxy.settings import RESTART_ONLY

log = logging.getLogger(__name__)

POLL_S = 2.0


class Reloader:
    """A daemon thread that watches the config files and applies changes through the manager.

    `overrides` are the `proxy:` settings the command line set (--host, --port): they apply to
    every config read again, as they did to the first one.
    """

    def __init__(self, context: ProxyContext, launcher: ProcessLauncher | None, poll_s: float = POLL_S,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self._context = context
        self._launcher = launcher
        if launcher is not None:  # a reload then reaches the launcher in the manager's one step
            launcher.follow(lambda: context.manager.config)
        self._overrides = dict(overrides or {})
        self._poll_s = poll_s
        self._requested = threading.Event()
        self._stopped = threading.Event()
        self._seen = self._stamps(context.config)

    def request(self) -> None:
        """Ask for a reload (safe from a signal handler: it only sets an event)."""
        self._requested.set()

    def start(self) -> None:
        self._context.reload = self.reload
        threading.Thread(target=self._run, name="config-reloader", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._requested.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            asked = self._requested.wait(self._poll_s)
            self._requested.clear()
            if self._stopped.is_set():
                return
            try:
                stamps = self._stamps(self._context.config)
                if asked or stamps != self._seen:
                    self._seen = stamps
                    self.reload()
            except Exception:
                log.exception("config reload failed")

    def reload(self) -> bool:
        """Read the config and keys again and apply them; keep the old ones if they are invalid."""
        read = self._read()
        if read is None:
            return False
        new, keys = read
        restart = self._apply(new, keys)
        log.info("config reloaded: %d model(s); restarting after their requests: %s",
                 len(new.models), ", ".join(restart) or "none")
        for name in restart:
            try:
                self._context.manager.unload(name, timeout_s=new.proxy.queue_timeout_s, cause="reload")
            except Exception as exc:  # a model still busy keeps its old profile until it stops
                log.warning("model %s: not restarted after reload: %s", name, exc)
        return True

    def _read(self) -> tuple[Config, Keys] | None:
        """Return the new config whole, as it will apply, with its keys; None (logged) if invalid."""
        old = self._context.config
        try:
            new = load_config(old.path, empty_ok=False)  # an emptied file must not reset everything
            new = dataclasses.replace(new, proxy=dataclasses.replace(new.proxy, **self._overrides))
            keys = load_keys(new.proxy.api_tokens_path, disabled=new.proxy.disable_auth, create_missing=False)
            self._context.manager.memory.budgets(new)  # proxy.gpus: auto must see its GPUs
        except ConfigError as exc:
            log.error("config not reloaded, keeping the running one: %s", exc)
            return None
        return _keep_restart_only_settings(old, new), keys

    def _apply(self, new: Config, keys: Keys) -> list[str]:
        """Publish a config built whole; return the models that must restart to apply it.

        Nothing is published before everything has been read and checked. The config is swapped
        in one step, under the manager's lock (the launcher and every view read the manager's),
        with the peers' models merged in (proxy/peers.py); the keys are one reference swapped just
        before it.
        """
        self._context.keys = keys
        return self._context.peers.apply(new)

    @staticmethod
    def _stamps(config: Config) -> dict[Path, float]:
        paths = [config.path, config.proxy.api_tokens_path]
        if config.proxy.profiles_dir.is_dir():
            paths += sorted(config.proxy.profiles_dir.glob("*.y*ml"))
        stamps = {}
        for path in paths:
            try:
                stamps[path] = path.stat().st_mtime
            except OSError:
                stamps[path] = -1.0
        return stamps


def _keep_restart_only_settings(old: Config, new: Config) -> Config:
    """Return new with the settings that only a restart can change taken from old (and say so)."""
    changed = [key for key in RESTART_ONLY if getattr(old.proxy, key) != getattr(new.proxy, key)]
    if not changed:
        return new
    log.warning("proxy.%s changed: restart the proxy to apply", ", proxy.".join(changed))
    kept = {key: getattr(old.proxy, key) for key in changed}
    return dataclasses.replace(new, proxy=dataclasses.replace(new.proxy, **kept))
