"""Hardening (issue 10): reloads applied in one step, keep_alive beyond any date, backends reaped by
session, one proxy per state folder, key-file errors without keys, files that vanish or go empty,
bounded backend output, summaries for clients and tails for admins, one retry of a dead connection.

The manager's rules run with its in-memory process and fake clock; everything else runs the real
proxy.py, the real supervisor and real child processes, with the OS process table as the judge.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from proxy.config import load_config
from proxy.errors import UnknownModel
from proxy.manager import ModelManager, State
from tests.conftest import ProxyProcess, fake_profile
from tests.test_manager import FakeClock, FakeLauncher, make_config, state

Start = Callable[..., ProxyProcess]
HUGE_KEEP_ALIVES = [1e12, 1e308, "100000000h"]


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ----- High 4: a reload is applied in one step ------------------------------------------------------

def test_reload_removing_an_unloaded_profile_and_adding_another_applies_whole(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, loaded={}, idle={}, edited={}), launcher, clock)
    try:
        manager.acquire("loaded", timeout_s=5).release()
        (tmp_path / "model_configs" / "idle.yml").unlink()
        new = make_config(tmp_path, loaded={}, edited={"unload_timer": 7}, added={})

        assert manager.reload(new) == []  # nothing loaded changed: nothing restarts

        with pytest.raises(UnknownModel):
            manager.acquire("idle", timeout_s=1)
        assert {status.name for status in manager.snapshot()} == {"loaded", "edited", "added"}
        manager.acquire("added", timeout_s=5).release()
        manager.acquire("edited", timeout_s=5).release()
        assert launcher.last("edited").model.unload_timer_s == 7
        assert state(manager, "loaded") is State.STOPPED  # swapped out (one slot), never restarted by the reload
        assert launcher.count("loaded") == 1
    finally:
        manager.shutdown()


def test_a_profile_removed_while_loaded_and_added_back_answers_again(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, back={}), launcher, clock)
    try:
        lease = manager.acquire("back", timeout_s=5)
        profile = (tmp_path / "model_configs" / "back.yml").read_text()
        (tmp_path / "model_configs" / "back.yml").unlink()
        assert manager.reload(load_config(tmp_path / "config.yml")) == ["back"]
        (tmp_path / "model_configs" / "back.yml").write_text(profile)
        assert manager.reload(load_config(tmp_path / "config.yml")) == []  # the same profile: keep it running

        manager.acquire("back", timeout_s=5).release()
        lease.release()
        assert launcher.count("back") == 1
    finally:
        manager.shutdown()


def test_sighup_and_post_reload_remove_an_unloaded_profile_and_add_another(start_proxy: Start) -> None:
    proxy = start_proxy({"kept": fake_profile(), "idle": fake_profile(), "spare": fake_profile()})
    assert proxy.chat("kept").status_code == 200
    profiles = proxy.config_path.parent / "model_configs"

    (profiles / "fresh.yml").write_text(yaml.safe_dump(fake_profile()))
    (profiles / "idle.yml").unlink()
    proxy.popen.send_signal(signal.SIGHUP)
    proxy.wait_for(lambda: "config reloaded" in proxy.log(), timeout_s=10, what="the SIGHUP reload")
    assert proxy.chat("fresh").status_code == 200
    assert proxy.chat("idle").status_code == 404
    assert proxy.chat("kept").status_code == 200

    (profiles / "newer.yml").write_text(yaml.safe_dump(fake_profile()))
    (profiles / "spare.yml").unlink()
    reloaded = proxy.post("/reload", admin=True)
    assert reloaded.status_code == 200, reloaded.text
    assert sorted(reloaded.json()["models"]) == ["fresh", "kept", "newer"]
    assert proxy.chat("newer").status_code == 200
    assert proxy.chat("spare").status_code == 404
    assert "Traceback" not in proxy.log()


# ----- Medium 5: keep_alive beyond any date means never --------------------------------------------

@pytest.mark.parametrize("keep_alive_s", [1e12, 1e308])
def test_keep_alive_beyond_a_date_means_never_in_the_snapshot(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock, keep_alive_s: float) -> None:
    manager = ModelManager(make_config(tmp_path, alpha={}), launcher, clock)
    try:
        manager.acquire("alpha", keep_alive_s=keep_alive_s, timeout_s=5).release()
        [status] = manager.snapshot()
        assert status.keep_alive_s == math.inf and status.expires_at is None
        clock.advance(1e9)
        assert manager.expire_idle() == math.inf and state(manager, "alpha") is State.READY
    finally:
        manager.shutdown()


def test_an_unload_timer_beyond_a_date_means_never(tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, alpha={"unload_timer": 1e12}), launcher, clock)
    try:
        manager.acquire("alpha", timeout_s=5).release()
        [status] = manager.snapshot()
        assert status.keep_alive_s == math.inf and status.expires_at is None
    finally:
        manager.shutdown()


@pytest.mark.parametrize("keep_alive", HUGE_KEEP_ALIVES, ids=["1e12", "1e308", "100000000h"])
def test_views_answer_after_a_keep_alive_beyond_a_date(start_proxy: Start, keep_alive: object) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    assert proxy.chat("fake", keep_alive=keep_alive).status_code == 200
    for path in ("/status", "/v1/models", "/api/ps"):
        assert proxy.get(path).status_code == 200, path
    assert proxy.status("fake")["unloads"] == "never" and proxy.status("fake")["expires_at"] is None
    [running] = proxy.get("/api/ps").json()["models"]
    assert running["expires_at"].startswith("2")  # now + Ollama's forever (about 292 years)
