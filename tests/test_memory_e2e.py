"""Memory-aware scheduling end to end: the real proxy.py with budgets, in front of real processes.

NVML is the boundary this machine cannot cross (it has no GPU): the proxy imports the fake
`pynvml` of tests/fake_nvml, whose GPUs live in files, and the fake backends take and free that
"VRAM" as they start and stop (--vram), out of memory included. The RAM budget runs in front of
real llama.cpp servers (SmolLM2 on the CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, ProxyProcess, fake_profile, llamacpp_profile, wait_until
from tests.fake_nvml import fake_gpu

Start = Callable[..., ProxyProcess]
GiB = 1024 ** 3
FAKE_NVML = ROOT / "tests" / "fake_nvml"


def fake_gpus(tmp_path: Path, *totals: int) -> dict[str, str]:
    """Set up fake GPUs; return the environment that makes the proxy (and its backends) see them."""
    directory = tmp_path / "gpus"
    fake_gpu.setup(directory, [{"total": total, "name": f"Fake GPU {index}"} for index, total in enumerate(totals)])
    return {"FAKE_NVML_DIR": str(directory),
            "PYTHONPATH": os.pathsep.join([str(FAKE_NVML), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def status(proxy: ProxyProcess) -> dict[str, Any]:
    answer = proxy.get("/status", admin=True)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def models(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in status(proxy)["models"]}


def loaded(proxy: ProxyProcess) -> set[str]:
    return {name for name, entry in models(proxy).items() if entry["state"] == "ready"}


def ask(proxy: ProxyProcess, model: str) -> None:
    answer = proxy.chat(model, max_tokens=4, temperature=0)
    assert answer.status_code == 200, f"{model}: {answer.status_code} {answer.text}\n{proxy.log()}"


def test_budgets_measurement_slow_recovery_and_out_of_memory_with_fake_gpus(start_proxy: Start,
                                                                           tmp_path: Path) -> None:
    env = fake_gpus(tmp_path, 24 * GiB)
    profiles = {
        "embed": fake_profile("--vram", "2GiB", pinned=True, footprint={"vram": "2GiB"}),
        # No footprint: counted as nothing until its first load is measured through NVML.
        "a": fake_profile("--vram", "12GiB", "--vram-release-s", "1.5"),
        "b": fake_profile("--vram", "12GiB", footprint={"vram": "12GiB"}),
        "c": fake_profile("--vram", "20GiB"),  # no footprint, and more than is left: out of memory at load
        "huge": fake_profile("--vram", "30GiB", footprint={"vram": "30GiB"}),
    }
    proxy = start_proxy(profiles, env=env, proxy={"gpus": "auto", "gpu_reserve": "1GiB", "max_loaded_models": 4,
                                                  "unload_timer": 600})

    ask(proxy, "embed")
    ask(proxy, "a")
    entry = models(proxy)["a"]
    assert entry["footprint"] == {"vram": 12 * GiB, "ram": 0, "gpus": None, "source": "measured"}
    assert entry["memory"] == {"gpu0": 12 * GiB}
    memory = status(proxy)["memory"]
    assert memory == [{"device": "gpu0", "budget": 23 * GiB, "used": {"embed": 2 * GiB, "a": 12 * GiB},
                       "available": 9 * GiB,
                       "nvml": {"name": "Fake GPU 0", "total": 24 * GiB, "free": 10 * GiB, "used": 14 * GiB}}]

    # b (12 GiB) does not fit beside embed and a: a goes (embed is pinned, though used longer ago), and b
    # starts only once the fake GPU shows a's memory back, 1.5 s after a exited.
    ask(proxy, "b")
    assert loaded(proxy) == {"embed", "b"}
    log = proxy.log()
    assert "model a: ready -> stopping (swap to b: the least recently used idle model on gpu0" in log
    assert "out of memory" not in log
    learned = json.loads((proxy.config_path.parent / "run" / "footprints.json").read_text())
    assert learned["a"]["vram"] == {"0": 12 * GiB}

    # c's footprint is unknown, so by the count it fits; the GPU says otherwise. The proxy unloads the
    # idle b (never the pinned embed) and tries once more, and then c fits.
    ask(proxy, "c")
    assert loaded(proxy) == {"embed", "c"}
    assert "model c: out of memory while loading; unloading b, then trying once more" in proxy.log()

    started = time.monotonic()
    refused = proxy.chat("huge", max_tokens=4)
    assert refused.status_code == 503 and time.monotonic() - started < 5
    assert refused.json()["error"]["code"] == "insufficient_memory"
    assert refused.json()["error"]["message"] == (
        "huge needs 30 GiB on gpu0 (declared footprint) and cannot fit on it: gpu0 has 23 GiB, 2 GiB of it pinned")
    assert loaded(proxy) == {"embed", "c"}  # nothing was evicted for it

    running = {record["name"].removesuffix(":latest"): record for record in proxy.get("/api/ps").json()["models"]}
    assert (running["embed"]["size_vram"], running["c"]["size_vram"]) == (2 * GiB, 20 * GiB)


def test_placement_tells_each_backend_its_gpu(start_proxy: Start, tmp_path: Path) -> None:
    env = fake_gpus(tmp_path, 24 * GiB, 24 * GiB)
    profiles = {
        "big": fake_profile("--vram", "20GiB", footprint={"vram": "20GiB", "gpus": [0]}),
        "small": fake_profile("--vram", "8GiB", footprint={"vram": "8GiB"}),  # fits only on gpu1 beside big
        "wide": fake_profile("--vram", "0:2GiB,1:2GiB", footprint={"vram": ["2GiB", "2GiB"], "gpus": [0, 1]}),
    }
    proxy = start_proxy(profiles, env=env, proxy={"gpus": {0: "24GiB", 1: "24GiB"}, "max_loaded_models": 3})

    for name in ("big", "small", "wide"):
        ask(proxy, name)

    pids = {name: entry["pid"] for name, entry in models(proxy).items()}
    usage = {record["pid"]: record["usage"] for record in fake_gpu.processes(env["FAKE_NVML_DIR"])}
    assert usage[pids["big"]] == {0: 20 * GiB}
    assert usage[pids["small"]] == {1: 8 * GiB}  # told CUDA_VISIBLE_DEVICES=1: its "GPU 0" is gpu1
    assert usage[pids["wide"]] == {0: 2 * GiB, 1: 2 * GiB}
    assert {name: entry["memory"] for name, entry in models(proxy).items()} == {
        "big": {"gpu0": 20 * GiB}, "small": {"gpu1": 8 * GiB}, "wide": {"gpu0": 2 * GiB, "gpu1": 2 * GiB}}


def test_gpus_auto_without_nvml_is_a_clear_start_up_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text("proxy:\n  gpus: auto\n  disable_auth: true\n")
    env = {key: value for key, value in os.environ.items() if key != "FAKE_NVML_DIR"}
    env["PYTHONPATH"] = str(FAKE_NVML)  # the fake without its folder: NVML as on a machine without a driver

    done = subprocess.run([sys.executable, str(ROOT / "proxy.py"), "--config", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert "config error:" in done.stderr and "proxy.gpus: auto" in done.stderr and "NVML" in done.stderr


def test_ram_budget_keeps_the_pinned_model_and_the_latest_resident_with_real_llama_cpp(
        start_proxy: Start, gguf: Path) -> None:
    """The README's example on the CPU: three SmolLM2 profiles, RAM for two, the embedding model pinned."""
    profiles = {
        "embed": llamacpp_profile(gguf, pinned=True, footprint={"ram": "1GiB"}),
        "chat-a": llamacpp_profile(gguf, footprint={"ram": "1GiB"}),
        "chat-b": llamacpp_profile(gguf, footprint={"ram": "1GiB"}),
    }
    proxy = start_proxy(profiles, proxy={"ram_budget": "2.5GiB", "max_loaded_models": 3, "unload_timer": 600})

    ask(proxy, "embed")
    ask(proxy, "chat-a")
    assert loaded(proxy) == {"embed", "chat-a"}
    ask(proxy, "chat-b")  # no room for a third: chat-a goes, not the pinned embed (used longest ago)
    assert loaded(proxy) == {"embed", "chat-b"}
    ask(proxy, "chat-a")
    assert loaded(proxy) == {"embed", "chat-a"}

    memory = status(proxy)["memory"]
    assert memory == [{"device": "ram", "budget": int(2.5 * GiB), "used": {"embed": GiB, "chat-a": GiB},
                       "available": GiB // 2, "nvml": None}]
    running = {record["name"].removesuffix(":latest"): record for record in proxy.get("/api/ps").json()["models"]}
    assert sorted(running) == ["chat-a", "embed"]
    assert running["embed"]["size"] == GiB and running["embed"]["size_vram"] == 0
    wait_until(lambda: len(proxy.backends()) == 2, what="two llama.cpp servers and no more")
