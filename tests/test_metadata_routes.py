"""Metadata routes never load, swap or keep a model alive: polled all through an idle countdown,
the model still unloads on time, and a model that was never loaded never starts (the real
proxy.py in front of tests/fake_backend.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.conftest import ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]
IDLE_S = 2.0


def poll_every_metadata_route(proxy: ProxyProcess) -> None:
    for path in ("/v1/models", "/v1/models/warm", "/v1/models/cold", "/api/tags", "/api/ps", "/models",
                 "/props?model=warm", "/props?model=cold", "/status"):
        assert proxy.get(path, timeout=10).status_code == 200, path
    for name in ("warm", "cold"):
        assert proxy.post("/api/show", {"model": name}, timeout=10).status_code == 200, name


def test_polling_metadata_routes_neither_loads_nor_keeps_a_model_alive(start_proxy: Start) -> None:
    proxy = start_proxy({"warm": fake_profile(unload_timer=IDLE_S), "cold": fake_profile()},
                        proxy={"max_loaded_models": 1})
    assert proxy.chat("warm").status_code == 200
    answered = time.monotonic()
    served = proxy.status("warm")["requests_served"]

    unloaded_at = None
    while time.monotonic() - answered < IDLE_S + 3:
        poll_every_metadata_route(proxy)
        if proxy.status("warm")["state"] == "stopped":
            unloaded_at = time.monotonic()
            break
        assert proxy.status("cold")["state"] == "stopped"  # never started, so never a swap either
        time.sleep(0.05)
    assert unloaded_at is not None, f"warm was still loaded {IDLE_S + 3:g}s after its last answer"
    assert IDLE_S - 0.2 <= unloaded_at - answered <= IDLE_S + 1.5, unloaded_at - answered
    assert proxy.status("warm")["requests_served"] == served  # no poll counted as a request

    poll_every_metadata_route(proxy)
    assert proxy.status("warm")["state"] == "stopped" and proxy.status("cold")["state"] == "stopped"
    assert not proxy.backends()
