"""What every view needs, built once by create_app and kept in app.extensions["proxy"]."""

from __future__ import annotations

from collections.abc import Callable

from flask import current_app, request

from proxy.auth import Keys, RateLimiter
from proxy.config import Config
from proxy.manager import ModelManager
from proxy.upstream import Upstream


class ProxyContext:
    """The manager, the upstream client and the keys; `keys` is replaced when api_tokens.yml changes."""

    def __init__(self, manager: ModelManager, upstream: Upstream, keys: Keys, started_at: float) -> None:
        self.manager = manager
        self.upstream = upstream
        self.keys = keys
        self.started_at = started_at
        self.limiter = RateLimiter()
        self.reload: Callable[[], bool] | None = None  # set by proxy.py when live reload runs

    def authorize(self, *, admin: bool = False) -> None:
        """Check the request's key (and its rate limit); remember the key's name for the access log."""
        entry = self.keys.check(request.headers, admin=admin)
        if entry is not None:
            request.environ["proxy.key"] = entry.name
        self.limiter.check(entry)

    @property
    def config(self) -> Config:
        """The current config (the manager owns it; a reload replaces it)."""
        return self.manager.config

    @staticmethod
    def current() -> ProxyContext:
        context: ProxyContext = current_app.extensions["proxy"]
        return context
