"""The declared config keys drive reading, unknown-key errors and reloads: the `proxy:` keys of
proxy/settings.py and the profile keys of proxy/profiles.py, each declared once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.app import create_app
from proxy.config import ConfigError, load_config
from proxy.manager import ModelManager
from proxy.profiles import COMMAND_KEYS, LLAMACPP_KEYS, PROFILE_KEYS, TABBY_SECTIONS
from proxy.reloader import Reloader
from proxy.settings import KNOWN_KEYS, RESTART_ONLY, SETTINGS
from tests.conftest import API_KEY, ADMIN_KEY, fake_profile, write_config
from tests.test_manager import FakeLauncher

# A valid value for every `proxy:` key, other than what write_config writes: a reload changes them all.
CHANGED: dict[str, Any] = {
    "host": "127.0.0.2", "port": 9001, "threads": 32, "reserved_threads": 4, "key_max_concurrent": 3,
    "client_timeout": 61, "connection_limit": 999, "channel_timeout": 31, "header_timeout": 11, "body_timeout": 61,
    "unload_timer": "7m", "max_loaded_models": 2, "startup_timeout": 21, "stop_grace": 4, "queue_timeout": 31,
    "connect_timeout": 6, "read_timeout": 31, "backend_ports": "6000-6099", "profiles_dir": "profiles",
    "api_tokens": "other_tokens.yml", "state_dir": "other_run", "disable_auth": True, "tabby_dir": "tabby",
    "max_body_mb": 65, "max_answer_mb": 257, "max_concurrent": 2, "max_queue": 10, "drain_timeout": 31,
    "cors_origins": ["https://chat.example.org"], "log_bodies": True, "loopback_without_key": True, "ollama_version": "0.12.7",
    "tabby_auth": "keys", "tabby_python": "python3", "gpus": {0: "20GiB"}, "gpu_reserve": "1GiB",
    "ram_budget": "8GiB", "preload": ["a"], "metrics_public": True, "request_log": "off", "request_log_days": 7,
    "peers": [{"name": "gpu-box", "url": "http://127.0.0.1:9", "api_key": "peer-key", "prefer": ["a"], "refresh": 5}],
}


def test_an_empty_proxy_section_reads_as_the_declared_defaults(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("proxy: {}\n")
    settings = load_config(tmp_path / "config.yml").proxy

    for setting in SETTINGS:
        expected = (tmp_path / setting.default).resolve() if isinstance(setting.default, Path) else setting.default
        assert getattr(settings, setting.attr) == expected, setting.key


def test_an_unknown_proxy_key_lists_the_declared_keys(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("proxy:\n  colour: blue\n")

    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.yml")

    assert str(caught.value) == (f"{tmp_path / 'config.yml'}: proxy.colour: unknown key "
                                 f"(known keys: {', '.join(sorted(KNOWN_KEYS))})")


@pytest.mark.parametrize(("profile", "where", "keys"), [
    pytest.param({"colour": 1}, "", {key.key for key in PROFILE_KEYS} | set(TABBY_SECTIONS), id="profile"),
    pytest.param({"backend": "llamacpp", "llamacpp": {"model_path": "m.gguf", "colour": 1}}, "llamacpp.",
                 {key.key for key in LLAMACPP_KEYS}, id="llamacpp"),
    pytest.param({"backend": "command", "command": {"cmd": "s ${PORT}", "colour": 1}}, "command.",
                 {key.key for key in COMMAND_KEYS}, id="command"),
])
def test_an_unknown_profile_key_lists_the_declared_keys(
        tmp_path: Path, profile: dict[str, Any], where: str, keys: set[str]) -> None:
    path = write_config(tmp_path, {"a": profile})

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == (f"{tmp_path / 'model_configs' / 'a.yml'}: {where}colour: unknown key "
                                 f"(known keys: {', '.join(sorted(keys))})")


def test_every_proxy_key_has_a_changed_value_for_the_reload_test() -> None:
    assert set(CHANGED) == KNOWN_KEYS, "give a new key a valid, changed value in CHANGED"


def test_a_reload_applies_every_reloadable_key_and_keeps_and_names_the_restart_only_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path, {"a": fake_profile()})
    config = load_config(path)
    manager = ModelManager(config, FakeLauncher())
    try:
        reloader = Reloader(create_app(config, manager).extensions["proxy"], None)
        (tmp_path / "profiles").mkdir()
        (tmp_path / "profiles" / "a.yml").write_text(yaml.safe_dump(fake_profile()))
        (tmp_path / "other_tokens.yml").write_text(yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY}))
        path.write_text(yaml.safe_dump({"proxy": CHANGED}))
        with caplog.at_level(logging.WARNING, logger="proxy.reloader"):
            assert reloader.reload()

        read = load_config(path).proxy
        for setting in SETTINGS:
            old, new = getattr(config.proxy, setting.attr), getattr(read, setting.attr)
            assert new != old, f"CHANGED[{setting.key!r}] changes nothing"
            assert getattr(manager.config.proxy, setting.attr) == (new if setting.reload else old), setting.key
        assert manager.budgets() == {"gpu0": 20 * 1024 ** 3, "ram": 8 * 1024 ** 3}  # the memory budgets apply at once
        [warning] = [record.getMessage() for record in caplog.records if "restart the proxy" in record.getMessage()]
        assert warning == f"proxy.{', proxy.'.join(RESTART_ONLY)} changed: restart the proxy to apply"
    finally:
        manager.shutdown()
