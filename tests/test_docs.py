"""The README's set-up commands: what a first-time user copies must work on a stock system."""

from __future__ import annotations

import re

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
