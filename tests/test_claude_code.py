"""Claude Code (`claude -p`, from npm) against the proxy's Anthropic Messages route, with the fake
backend answering: its ~76 KB request with many tools goes through and its answer is printed.

Installing Claude Code needs the npm registry (once, into a cache folder); running it needs nothing
beyond loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, fake_profile
from tests.test_responses import missing, recorded

CLAUDE_CODE_VERSION = "2.1.328"
CLAUDE_CODE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "model-proxy" / "claude-code"


@pytest.fixture(scope="session")
def claude() -> Path:
    """Claude Code from npm, installed once into a cache folder (PROXY_CLAUDE names one already there)."""
    given = os.environ.get("PROXY_CLAUDE")
    binary = Path(given) if given else CLAUDE_CODE_CACHE / "node_modules" / ".bin" / "claude"
    if not binary.is_file():
        if given:
            pytest.fail(f"PROXY_CLAUDE={given} is not a file")
        if shutil.which("npm") is None or shutil.which("node") is None:
            missing("Claude Code test: node and npm are not installed")
        CLAUDE_CODE_CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CLAUDE_CODE_CACHE),
                               f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not binary.is_file():
            missing(f"Claude Code test: npm install @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION} failed (offline?): "
                    f"{done.stderr[-500:]}")
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    if version.returncode != 0:
        missing(f"Claude Code test: {binary} does not run here: {version.stdout[-300:]}{version.stderr[-500:]}")
    return binary


@pytest.mark.timeout(180)
def test_claude_code_answers_through_the_proxy(claude: Path, start_proxy: Any, tmp_path: Path) -> None:
    proxy = start_proxy({"fake": fake_profile("--record", aliases=["claude-*"])})
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "CLAUDE_CONFIG_DIR": str(home / ".claude"),
           "ANTHROPIC_BASE_URL": proxy.url, "ANTHROPIC_AUTH_TOKEN": API_KEY,
           "ANTHROPIC_MODEL": "fake", "ANTHROPIC_SMALL_FAST_MODEL": "fake",
           "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    try:
        done = subprocess.run([str(claude), "-p", "Say hello."], cwd=work, env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as late:
        pytest.fail(f"claude -p ran past 120 s:\n{late.stdout!r}\n{late.stderr!r}\n{proxy.log()[-3000:]}")
    assert done.returncode == 0, (f"claude -p failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}\n"
                                  f"{proxy.log()[-3000:]}")
    assert done.stdout.strip() == "tok0 tok1 tok2 tok3 tok4", f"{done.stdout!r}\n{done.stderr[-2000:]}"
    sent = recorded(proxy)[-1]
    assert len(sent["tools"]) >= 5 and sent["stream"] is True
    assert all(tool["type"] == "function" and tool["function"]["name"] for tool in sent["tools"])
