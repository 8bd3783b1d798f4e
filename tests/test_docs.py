"""The README: what a first-time user copies must work on a stock system, and its config tables are
the declared keys (proxy/settings.py, proxy/profiles.py), with their defaults and docs."""

from __future__ import annotations

import re

import pytest

from proxy.profiles import COMMAND_KEYS, FOOTPRINT_KEYS, LLAMACPP_KEYS, PROFILE_KEYS, REMOTE_KEYS, ProfileKey
from proxy.settings import PEER_KEYS, SETTINGS, Setting
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]


def test_the_quick_start_makes_a_virtual_environment_before_any_pip_install() -> None:
    # Debian and Ubuntu refuse `pip install` outside a venv (PEP 668, "externally-managed-environment").
    commands = quick_start_commands()
    first_pip = next(number for number, block in enumerate(commands) if "pip install" in block)
    assert any("python3 -m venv .venv" in block and ". .venv/bin/activate" in block
               for block in commands[:first_pip]), commands


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = "pip install -r requirements-dev.txt && pip install --no-deps -r requirements-demo.txt && python -m pytest"
    assert command in quick_start_commands() and command in ci


# ----- the config tables are the declarations ------------------------------------------------------

def markdown_table(header: str, rows: list[tuple[str, str, str]]) -> str:
    return "\n".join([header, "|---|---|---|", *(f"| {key} | {default} | {doc} |" for key, default, doc in rows)])


def shown_default(setting: Setting) -> str:
    """Return a setting's default as the README's Default column shows it."""
    if setting.shown is not None:
        return setting.shown
    value = setting.default
    if value is None:
        return "unset"
    if value == ():
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def assert_in_readme(table: str) -> None:
    assert table in README, f"the README's table differs from the declarations; it should read:\n\n{table}\n"


def test_the_readme_proxy_table_lists_exactly_the_declared_keys_with_their_defaults_and_docs() -> None:
    rows = [(f"`{setting.key}`", shown_default(setting), setting.doc) for setting in SETTINGS]
    assert_in_readme(markdown_table("| `proxy:` key | Default | Meaning |", rows))


@pytest.mark.parametrize(("header", "keys"), [
    pytest.param("| Key | Default | Meaning |", PROFILE_KEYS, id="profile"),
    pytest.param("| `llamacpp:` key | Default | Meaning |", LLAMACPP_KEYS, id="llamacpp"),
    pytest.param("| `command:` key | Default | Meaning |", COMMAND_KEYS, id="command"),
    pytest.param("| `footprint:` key | Default | Meaning |", FOOTPRINT_KEYS, id="footprint"),
    pytest.param("| `remote:` key | Default | Meaning |", REMOTE_KEYS, id="remote"),
    pytest.param("| `peers:` key | Default | Meaning |", PEER_KEYS, id="peers"),
])
def test_the_readme_profile_tables_list_exactly_the_declared_keys(header: str, keys: tuple[ProfileKey, ...]) -> None:
    assert_in_readme(markdown_table(header, [(f"`{key.key}`", key.default, key.doc) for key in keys]))


def test_the_readme_names_exactly_the_keys_a_reload_cannot_apply() -> None:
    keys = [setting.key for setting in SETTINGS if not setting.reload]
    sentence = f"`proxy.{keys[0]}`, " + ", ".join(f"`{key}`" for key in keys[1:-1]) + f" and `{keys[-1]}` need a restart"
    assert sentence in README, f"the Reloading section should say: {sentence}"


def test_the_module_table_lists_every_module_of_the_package() -> None:
    # STYLE.md: the layout tells the architecture, and the README's module table is how a newcomer reads it.
    section = README.split("| Module | Role |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+\.py)` \|", section, flags=re.M))
    present = {path.relative_to(ROOT).as_posix() for path in (ROOT / "proxy").rglob("*.py")
               if path.name != "__init__.py" or path.parent.name == "backends"}
    present.add("proxy.py")
    assert listed == present, {"missing from the README": sorted(present - listed),
                               "listed but gone": sorted(listed - present)}
