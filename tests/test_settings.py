"""The declared config keys drive reading and unknown-key errors: the `proxy:` keys of
proxy/settings.py and the profile keys of proxy/profiles.py, each declared once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, load_config
from proxy.profiles import COMMAND_KEYS, LLAMACPP_KEYS, PROFILE_KEYS, TABBY_SECTIONS
from proxy.settings import KNOWN_KEYS, SETTINGS
from tests.conftest import write_config


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
