"""What every view needs, built once by create_app and kept in app.extensions["proxy"]."""

from __future__ import annotations

from collections.abc import Callable

from flask import current_app, request

from proxy.admission import BODIES_IN_BUDGET, RESERVED_BLUEPRINTS, Admission, BodyBudget
from proxy.auth import KeyEntry, Keys, RateLimiter, keyless_entry
from proxy.config import Config, ModelConfig
from proxy.manager import ModelManager
from proxy.metrics import Metrics
from proxy.observe import Observers, Recent
from proxy.request_log import RequestLog
from proxy.peers import Peers
from proxy.upstream import Upstream


class ProxyContext:
    """The manager, the upstream client and the keys; `keys` is replaced when api_tokens.yml changes."""

    def __init__(self, manager: ModelManager, upstream: Upstream, keys: Keys, started_at: float,
                 observers: Observers | None = None, recent: Recent | None = None) -> None:
        self.manager = manager
        self.upstream = upstream
        self.keys = keys
        self.started_at = started_at
        self.recent = recent or Recent()  # the dashboard's last hour; fed through `observers`
        self.observers = observers or Observers([self.recent])  # what every finished request is reported to
        self.metrics: Metrics  # set by create_app, which adds it to the observers
        self.request_log: RequestLog | None = None  # set by create_app: what proxy.py opened, if the log is on
        self.limiter = RateLimiter()
        self.admission = Admission(manager.config.proxy.request_slots)  # threads are fixed until a restart
        self.bodies = BodyBudget(int(BODIES_IN_BUDGET * manager.config.proxy.max_body_mb * 1024 * 1024))
        self.reload: Callable[[], bool] | None = None  # set by proxy.py when live reload runs
        self.peers = Peers(manager)  # proxy.py starts its refresher; reloads go through peers.apply()

    def authorize(self, *, admin: bool = False) -> KeyEntry | None:
        """Check the request's key, its rate limit and, outside admin routes, admission (requests in
        progress, all keys together and this key's); remember the key's name for the access log.
        Return the caller's key entry (None with auth off; LOOPBACK_KEY for a keyless loopback caller
        under proxy.loopback_without_key).

        The admission slot goes into the environ; the access log releases it when the body closes.
        """
        keyless = keyless_entry(self.config.proxy.loopback_without_key, request.environ.get("REMOTE_ADDR"))
        entry = self.keys.check(request.headers, admin=admin, keyless=keyless)
        if entry is not None:
            request.environ["proxy.key"] = entry.name
        self.limiter.check(entry)
        if request.blueprint not in RESERVED_BLUEPRINTS and "proxy.slot" not in request.environ:
            request.environ["proxy.slot"] = self.admission.admit(entry, self.config.proxy.key_max_concurrent)
        return entry

    def listed_state(self, model: ModelConfig, state: str) -> str:
        """Return the state model listings show: a peer's own report for its models (whether it is loaded
        there), else the manager's `state`."""
        return self.peers.reported_state(model) or state

    @property
    def config(self) -> Config:
        """The current config (the manager owns it; a reload replaces it)."""
        return self.manager.config

    @staticmethod
    def current() -> ProxyContext:
        context: ProxyContext = current_app.extensions["proxy"]
        return context
