"""What every view needs, built once by create_app and kept in app.extensions["proxy"]."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from proxy.auth import Keys
from proxy.config import Config
from proxy.manager import ModelManager
from proxy.upstream import Upstream


@dataclass(frozen=True, slots=True)
class ProxyContext:
    config: Config
    manager: ModelManager
    upstream: Upstream
    keys: Keys
    started_at: float

    @staticmethod
    def current() -> ProxyContext:
        context: ProxyContext = current_app.extensions["proxy"]
        return context
