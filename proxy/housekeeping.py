"""The manager's background threads, which only ask: the idle reaper (manager.expire_idle, which
re-checks everything under the lock) and the preloader (manager.preload for proxy.preload's models
at start-up, after a reload and after one of them crashed). They wake on the manager's Wakeups.
"""

from __future__ import annotations

import logging
import threading
import time

from proxy.manager import ModelManager

log = logging.getLogger(__name__)

PRELOAD_PAUSE_S = 5.0  # between preload rounds: a preloaded model that keeps crashing is retried this often
REAPER_IDLE_S = 60.0   # the reaper looks again at least this often


def start_housekeeping(manager: ModelManager) -> None:
    """Start the idle reaper and the preloader (daemon threads; they end when the manager shuts down)."""
    threading.Thread(target=_reap, args=(manager,), name="idle-reaper", daemon=True).start()
    threading.Thread(target=_preload, args=(manager,), name="preloader", daemon=True).start()
    manager.wakeups.preload.set()  # the start-up round


def _reap(manager: ModelManager) -> None:
    wake = manager.wakeups.reaper
    while not manager.closed:
        try:
            wait_s = manager.expire_idle()
        except Exception:
            log.exception("idle reaper: unexpected error")
            wait_s = 1.0
        wake.wait(min(wait_s, REAPER_IDLE_S))
        wake.clear()


def _preload(manager: ModelManager) -> None:
    wake = manager.wakeups.preload
    while True:
        wake.wait()
        wake.clear()
        if manager.closed:
            return
        for name in manager.config.proxy.preload:
            try:
                if manager.preload(name) is None:
                    wake.set()  # requests go first: try again after the pause
            except Exception:  # a profile removed by a reload meanwhile, a start that raised
                log.exception("model %s: preload failed", name)
        time.sleep(PRELOAD_PAUSE_S)  # a model that crashes at once is not restarted in a tight loop
