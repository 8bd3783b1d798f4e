"""The dashboard's Load and Unload buttons: each runs in a thread of its own through the manager's
public methods (a load is what a request would do: acquire, then release), at most one of each kind
per model at a time, so the page is answered at once and repeated clicks start nothing new.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from proxy.errors import ProxyError
from proxy.manager import ModelManager

log = logging.getLogger(__name__)


class Actions:
    """Load and unload requests from the dashboard, running in the background. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[tuple[str, str]] = set()  # guarded by _lock: (action, model)

    def load(self, manager: ModelManager, model: str, who: str) -> bool:
        """Start loading a model (waits in the queue like a request); return False if one is already running."""
        def run() -> None:
            manager.acquire(model).release()  # the lease's release starts the idle clock, as a request's does
        return self.start("load", model, who, run)

    def unload(self, manager: ModelManager, model: str, who: str) -> bool:
        """Start unloading a model once its requests finish (as /unload); return False if one is already running."""
        def run() -> None:
            manager.unload(model)
        return self.start("unload", model, who, run)

    def running(self) -> set[tuple[str, str]]:
        with self._lock:
            return set(self._running)

    def start(self, action: str, model: str, who: str, run: Callable[[], object]) -> bool:
        """Run `run` in the background as `action` on `model` (a peer's model: forwarded to the peer)."""
        with self._lock:
            if (action, model) in self._running:
                return False
            self._running.add((action, model))
        log.info("dashboard: %s asked to %s model %s", who, action, model)

        def work() -> None:
            try:
                run()
            except ProxyError as exc:  # the manager has logged the transition; say what the click got
                log.warning("dashboard: %s of model %s failed: %s", action, model, exc.message)
            except Exception:  # the top of a thread: one failure must not pass silently
                log.exception("dashboard: %s of model %s failed", action, model)
            finally:
                with self._lock:
                    self._running.discard((action, model))

        threading.Thread(target=work, name=f"ui-{action}-{model}", daemon=True).start()
        return True
