"""Hardening (issue 10): reloads applied in one step, keep_alive beyond any date, backends reaped by
session, one proxy per state folder, key-file errors without keys, files that vanish or go empty,
bounded backend output, summaries for clients and tails for admins, one retry of a dead connection.

The manager's rules run with its in-memory process and fake clock; everything else runs the real
proxy.py, the real supervisor and real child processes, with the OS process table as the judge.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from proxy.auth import load_keys
from proxy.config import load_config
from proxy.errors import UnknownModel
from proxy.manager import ModelManager, State
from tests.conftest import ADMIN_KEY, API_KEY, ROOT, ProxyProcess, fake_profile, free_port, write_config
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


# ----- Medium 10 and Low: the key file and config.yml: errors without keys, vanished, emptied, not UTF-8 -------

LEAKY_ADMIN_KEY = "leaky-admin-key-must-not-be-logged-0123"


def run_proxy(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run proxy.py to its exit (for starts that must fail); return its status and output."""
    return subprocess.run([sys.executable, str(ROOT / "proxy.py"), "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=config_path.parent)


def test_a_yaml_typo_in_the_key_file_is_reported_by_line_without_its_keys(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {"fake": fake_profile()})
    (tmp_path / "api_tokens.yml").write_text(f"api_key: {API_KEY}\nadmin_key: {LEAKY_ADMIN_KEY}: oops\n")

    started = run_proxy(config_path, "--port", str(free_port()))

    assert started.returncode == 2
    output = started.stdout + started.stderr
    assert LEAKY_ADMIN_KEY not in output and API_KEY not in output
    assert "api_tokens.yml: invalid YAML at line 2, column" in output
    assert "Traceback" not in output


def test_a_yaml_typo_in_the_key_file_on_reload_keeps_the_keys_and_logs_no_key(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    tokens = proxy.config_path.parent / "api_tokens.yml"
    tokens.write_text(f"api_key: {API_KEY}\nadmin_key: \"{LEAKY_ADMIN_KEY}\n  - [unclosed\n")

    assert proxy.post("/reload", admin=True).status_code == 400
    assert proxy.get("/v1/models").status_code == 200  # the running keys still work
    assert "invalid YAML at line" in proxy.log()
    assert LEAKY_ADMIN_KEY not in proxy.log()


def test_a_vanished_key_file_or_an_emptied_config_keeps_the_running_ones(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()}, proxy={"max_loaded_models": 2})
    directory = proxy.config_path.parent
    tokens = directory / "api_tokens.yml"
    saved = tokens.read_text()

    tokens.unlink()
    proxy.wait_for(lambda: "api_tokens.yml: file not found" in proxy.log(), timeout_s=10, what="the refused reload")
    assert proxy.post("/reload", admin=True).status_code == 400
    assert not tokens.exists()  # no new random keys behind the operator's back
    assert proxy.get("/v1/models").status_code == 200

    tokens.write_text(saved)
    proxy.config_path.write_text("")
    proxy.wait_for(lambda: "config.yml: the file is empty" in proxy.log(), timeout_s=10, what="the refused reload")
    assert proxy.post("/reload", admin=True).status_code == 400
    status = proxy.get("/status").json()
    assert status["max_loaded_models"] == 2  # not reset to the default 1
    assert proxy.chat("fake").status_code == 200


@pytest.mark.parametrize("which", ["config.yml", "api_tokens.yml", "model_configs/fake.yml"])
def test_a_file_that_is_not_utf8_is_a_config_error_with_status_2(tmp_path: Path, which: str) -> None:
    config_path = write_config(tmp_path, {"fake": fake_profile()})
    path = tmp_path / which
    path.write_bytes(path.read_bytes() + b"\n# caf\xe9 \xff\n")

    started = run_proxy(config_path, "--port", str(free_port()))

    assert started.returncode == 2, started.stderr
    assert f"config error: {path}: not valid UTF-8 (byte" in started.stderr
    assert "Traceback" not in started.stderr


def test_a_file_that_is_not_utf8_on_reload_is_a_400_and_keeps_the_config(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    proxy.config_path.write_bytes(proxy.config_path.read_bytes() + b"\n# \xff\n")

    answer = proxy.post("/reload", admin=True)

    assert answer.status_code == 400, answer.text
    assert proxy.chat("fake").status_code == 200
    assert "Traceback" not in proxy.log()


# ----- Low: the keys CLI under concurrent use ---------------------------------------------------------------

def test_parallel_key_additions_all_land_and_every_printed_key_works(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {})
    names = [f"user{index}" for index in range(10)]
    runs = [subprocess.Popen([sys.executable, str(ROOT / "proxy.py"), "--config", str(config_path), "keys", "add", name],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    printed = {}
    for name, run in zip(names, runs):
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        printed[name] = out.strip()

    keys = {entry.name: entry.key for entry in load_keys(tmp_path / "api_tokens.yml").entries}
    assert {name: keys.get(name) for name in names} == printed
    assert keys["admin_key"] == ADMIN_KEY and keys["api_key"] == API_KEY
