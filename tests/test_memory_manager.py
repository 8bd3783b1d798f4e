"""Memory-aware scheduling through the real ModelManager: budgets, declared footprints, placement,
pinning, out-of-memory retries and preloading, with the in-memory process of test_manager (the
process boundary) and its fake clock. The policy itself is tested on snapshots in test_scheduling.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import proxy.housekeeping
from proxy.config import Config, load_config
from proxy.errors import BackendFailed, InsufficientMemory
from proxy.footprints import Memory
from proxy.housekeeping import start_housekeeping
from proxy.manager import ModelManager, State
from proxy.nvml import Gpus
from tests.conftest import fake_profile, wait_until, write_config
from tests.fake_nvml import fake_gpu
from tests.test_manager import FakeClock, FakeLauncher
from tests.test_nvml import load_fake_pynvml

GiB = 1024 ** 3


def memory_config(tmp_path: Path, gpus: Any = None, max_loaded: int = 4, ram_budget: str | None = None,
                  preload: list[str] | None = None, **footprints: dict[str, Any]) -> Config:
    """Profiles named by keyword, each with its `footprint` (plus `pinned`, when given, beside it)."""
    profiles = {}
    for name, footprint in footprints.items():
        footprint = dict(footprint)
        pinned = footprint.pop("pinned", False)
        profiles[name] = fake_profile(footprint=footprint, pinned=pinned) if footprint else fake_profile(pinned=pinned)
    settings: dict[str, Any] = {"max_loaded_models": max_loaded, "unload_timer": 60, "queue_timeout": 5}
    settings.update({key: value for key, value in (("gpus", gpus), ("ram_budget", ram_budget),
                                                  ("preload", preload)) if value is not None})
    return load_config(write_config(tmp_path, profiles, proxy=settings))


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def managers() -> Iterator[list[ModelManager]]:
    made: list[ModelManager] = []
    yield made
    for manager in made:
        manager.shutdown()


def use(manager: ModelManager, name: str, clock: FakeClock) -> None:
    """One request on `name`: load it (or use it) and release, one fake second later than the last."""
    clock.advance(1)
    manager.acquire(name).release()


def states(manager: ModelManager) -> dict[str, str]:
    return {status.name: status.state for status in manager.snapshot()}


def test_models_load_side_by_side_while_they_fit_then_the_lru_idle_one_goes(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock, managers: list[ModelManager],
        caplog: pytest.LogCaptureFixture) -> None:
    config = memory_config(tmp_path, gpus={0: "24GiB"}, a={"vram": "10GiB"}, b={"vram": "10GiB"},
                           c={"vram": "10GiB"})
    manager = ModelManager(config, launcher, clock)
    managers.append(manager)

    use(manager, "a", clock)
    use(manager, "b", clock)
    assert states(manager) == {"a": "ready", "b": "ready", "c": "stopped"}  # 20 of 24 GiB: both fit
    use(manager, "a", clock)  # b is now the least recently used
    with caplog.at_level(logging.INFO, logger="proxy.manager"):
        use(manager, "c", clock)

    assert states(manager) == {"a": "ready", "b": "stopped", "c": "ready"}
    assert launcher.last("b").stopped.is_set() and not launcher.last("a").stopped.is_set()
    assert ("model b: ready -> stopping (swap to c: the least recently used idle model on gpu0; c needs 10 GiB on gpu0, "
            "4 GiB of 24 GiB free on gpu0)") in caplog.messages
    assert manager.budgets() == {"gpu0": 24 * GiB}
    held = {status.name: status.holds for status in manager.snapshot()}
    assert held == {"a": {"gpu0": 10 * GiB}, "b": {}, "c": {"gpu0": 10 * GiB}}


def test_a_pinned_model_is_never_evicted_for_another(tmp_path: Path, launcher: FakeLauncher, clock: FakeClock,
                                                     managers: list[ModelManager]) -> None:
    config = memory_config(tmp_path, gpus={0: "24GiB"}, embed={"vram": "4GiB", "pinned": True},
                           a={"vram": "12GiB"}, b={"vram": "12GiB"})
    manager = ModelManager(config, launcher, clock)
    managers.append(manager)

    use(manager, "embed", clock)  # the oldest: LRU alone would take it first
    for name in ("a", "b", "a", "b"):
        use(manager, name, clock)

    assert states(manager) == {"embed": "ready", "a": "stopped", "b": "ready"}
    assert launcher.count("embed") == 1 and not launcher.last("embed").stopped.is_set()
    assert manager.unload("embed") == ["embed"]  # /unload still may


def test_a_model_that_can_never_fit_is_refused_at_once_and_nothing_is_evicted(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock, managers: list[ModelManager]) -> None:
    config = memory_config(tmp_path, gpus={0: "24GiB", 1: "24GiB"}, embed={"vram": "12GiB", "pinned": True,
                                                                          "gpus": [0]},
                           small={"vram": "4GiB", "gpus": [1]}, huge={"vram": "30GiB"},
                           wide={"vram": "40GiB", "gpus": [0, 1]})
    manager = ModelManager(config, launcher, clock)
    managers.append(manager)
    use(manager, "embed", clock)
    use(manager, "small", clock)

    started = time.monotonic()
    with pytest.raises(InsufficientMemory) as refused:
        manager.acquire("huge")
    assert time.monotonic() - started < 1  # not after queue_timeout
    assert refused.value.status == 503
    assert str(refused.value) == ("huge needs 30 GiB on gpu0 (declared footprint) and cannot fit on any GPU: "
                                  "gpu0 has 24 GiB, 12 GiB of it pinned")
    with pytest.raises(InsufficientMemory, match=r"wide needs 20 GiB on gpu0, 20 GiB on gpu1 .*gpu0 has 24 GiB, "
                                                 r"12 GiB of it pinned"):
        manager.acquire("wide")
    assert states(manager) == {"embed": "ready", "small": "ready", "huge": "stopped", "wide": "stopped"}


def test_a_busy_model_drains_for_the_room_it_holds_and_is_never_cut(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock, managers: list[ModelManager]) -> None:
    config = memory_config(tmp_path, gpus={0: "24GiB"}, a={"vram": "14GiB"}, b={"vram": "14GiB"})
    manager = ModelManager(config, launcher, clock)
    managers.append(manager)
    lease = manager.acquire("a")
    got: list[str] = []

    waiter = threading.Thread(target=lambda: got.append(manager.acquire("b").model_name))
    waiter.start()
    time.sleep(0.3)
    assert states(manager)["a"] == "ready" and not launcher.last("a").stopped.is_set()
    assert got == [] and launcher.count("b") == 0  # b waits: it does not fit beside a
    lease.release()
    waiter.join(5)

    assert got == ["b"] and launcher.last("a").stopped.is_set()


def test_a_model_without_gpus_is_placed_where_it_fits_best_and_told_its_device(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock, managers: list[ModelManager]) -> None:
    config = memory_config(tmp_path, gpus={0: "24GiB", 1: "24GiB"}, max_loaded=4, big={"vram": "20GiB", "gpus": [0]},
                           mid={"vram": "8GiB"}, small={"vram": "3GiB"}, wide={"vram": [2, 2], "gpus": [0, 1]})
    manager = ModelManager(config, launcher, clock)
    managers.append(manager)

    use(manager, "big", clock)    # gpu0: 4 GiB left
    use(manager, "mid", clock)    # fits only on gpu1
    use(manager, "small", clock)  # fits on both: the best fit is gpu0, with 1 GiB left over
    use(manager, "wide", clock)

    devices = {name: launcher.last(name).model.devices for name in ("big", "mid", "small", "wide")}
    assert devices == {"big": (0,), "mid": (1,), "small": (0,), "wide": (0, 1)}
    holds = {status.name: status.holds for status in manager.snapshot()}
    assert holds["small"] == {"gpu0": 3 * GiB} and holds["mid"] == {"gpu1": 8 * GiB}


def test_ram_footprints_count_against_the_ram_budget(tmp_path: Path, launcher: FakeLauncher, clock: FakeClock,
                                                     managers: list[ModelManager]) -> None:
    config = memory_config(tmp_path, ram_budget="8GiB", a={"ram": "4GiB"}, b={"ram": "4GiB"}, c={"ram": "4GiB"})
    manager = ModelManager(config, launcher, clock)
    managers.append(manager)

    for name in ("a", "b", "c"):
        use(manager, name, clock)

    assert states(manager) == {"a": "stopped", "b": "ready", "c": "ready"}
    assert launcher.last("b").model.devices is None  # a CPU model is told no GPU


class OutOfMemoryLauncher(FakeLauncher):
    """A launcher whose loads of the models in `full` run out of memory, as torch reports it."""

    def __init__(self) -> None:
        super().__init__()
        self.full: dict[str, int] = {}  # model -> how many more loads fail

    def __call__(self, model: Any, on_exit: Any) -> Any:
        if self.full.get(model.name, 0) > 0:
            self.full[model.name] -= 1
            self.failures[model.name] = BackendFailed(
                f"{model.name}: the backend exited while loading",
                detail="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().__call__(model, on_exit)


def test_out_of_memory_at_load_evicts_the_idle_models_and_retries_once(
        tmp_path: Path, clock: FakeClock, managers: list[ModelManager]) -> None:
    # The footprints are too small: by the proxy's count b fits beside a, but the GPU disagrees.
    config = memory_config(tmp_path, gpus={0: "24GiB"}, a={"vram": "8GiB"}, b={"vram": "8GiB"},
                           pinned={"vram": "2GiB", "pinned": True})
    launcher = OutOfMemoryLauncher()
    manager = ModelManager(config, launcher, clock)
    managers.append(manager)
    use(manager, "pinned", clock)
    use(manager, "a", clock)
    launcher.full["b"] = 1

    use(manager, "b", clock)

    assert launcher.count("b") == 2 and launcher.last("a").stopped.is_set()
    assert not launcher.last("pinned").stopped.is_set()  # evicting for the retry spares a pinned model
    assert states(manager) == {"a": "stopped", "b": "ready", "pinned": "ready"}

    launcher.full["a"] = 2  # out of memory again after the retry: fail, saying so
    with pytest.raises(InsufficientMemory, match="a: the backend ran out of memory while loading, again after "
                                                 "every idle model was unloaded"):
        manager.acquire("a")
    assert launcher.count("a") == 3
    assert states(manager) == {"a": "failed", "b": "stopped", "pinned": "ready"}


def test_preloaded_models_start_in_order_while_they_fit_and_again_after_a_crash(
        tmp_path: Path, launcher: FakeLauncher, managers: list[ModelManager], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.housekeeping, "PRELOAD_PAUSE_S", 0.05)
    config = memory_config(tmp_path, gpus={0: "24GiB"}, preload=["embed", "chat", "extra"],
                           embed={"vram": "4GiB", "pinned": True}, chat={"vram": "16GiB"}, extra={"vram": "8GiB"})
    manager = ModelManager(config, launcher)
    managers.append(manager)

    start_housekeeping(manager)
    wait_until(lambda: states(manager)["chat"] == "ready", what="the preloads")
    time.sleep(0.2)
    assert states(manager) == {"embed": "ready", "chat": "ready", "extra": "stopped"}  # extra does not fit
    assert launcher.count("extra") == 0 and not launcher.last("chat").stopped.is_set()  # nothing evicted for it

    launcher.last("embed").crash()
    wait_until(lambda: launcher.count("embed") == 2 and states(manager)["embed"] == "ready",
               what="the crashed preload to start again")
    assert launcher.count("chat") == 1


def test_without_budgets_footprints_change_nothing(tmp_path: Path, launcher: FakeLauncher, clock: FakeClock,
                                                   managers: list[ModelManager]) -> None:
    config = memory_config(tmp_path, max_loaded=2, a={"vram": "100GiB"}, b={"vram": "100GiB"})
    manager = ModelManager(config, launcher, clock)
    managers.append(manager)

    use(manager, "a", clock)
    use(manager, "b", clock)

    assert states(manager) == {"a": "ready", "b": "ready"}
    assert launcher.last("a").model.devices is None  # not placed: nothing is counted
    assert manager.budgets() == {}
    assert [status.state for status in manager.snapshot()] == [State.READY.value] * 2


def readme_example(directory: Path) -> Path:
    """Write the README's memory example (one YAML block, a `# <file>:` comment before each file); return config.yml."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Memory: budgets, footprints, placement, pinning", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    files: dict[str, list[str]] = {}
    current: list[str] = []
    for line in block.splitlines():
        header = re.fullmatch(r"# ((?:model_configs/)?[\w.-]+\.yml):.*", line)
        if header:
            current = files.setdefault(header.group(1), [])
        else:
            current.append(line)
    assert set(files) == {"config.yml", "model_configs/embed.yml", "model_configs/coder.yml",
                          "model_configs/chat.yml"}
    for name, lines in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory / "config.yml"


def test_the_readme_example_places_its_models_as_it_says(tmp_path: Path, launcher: FakeLauncher, clock: FakeClock,
                                                        managers: list[ModelManager],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu.setup(tmp_path / "gpus", [24 * GiB, 24 * GiB])  # two 24 GiB GPUs, through the fake NVML
    monkeypatch.setenv(fake_gpu.ENV, str(tmp_path / "gpus"))
    load_fake_pynvml(monkeypatch)
    gpus = Gpus.open()
    assert gpus is not None
    config = load_config(readme_example(tmp_path))
    manager = ModelManager(config, launcher, clock, memory=Memory(gpus))
    managers.append(manager)

    assert manager.budgets() == {"gpu0": 24 * GiB - 512 * 1024 ** 2, "gpu1": 23 * GiB}
    assert config.proxy.preload == ("embed",) and config.models["embed"].pinned
    for name in ("embed", "coder", "chat"):
        use(manager, name, clock)

    assert states(manager) == {"chat": "ready", "coder": "ready", "embed": "ready"}
    devices = {name: launcher.last(name).model.devices for name in ("embed", "coder", "chat")}
    assert devices == {"embed": (1,), "coder": (0, 1), "chat": None}  # embed: the best fit; chat: not yet known
    footprints = {status.name: status.need.source for status in manager.snapshot()}
    assert footprints == {"chat": "unknown", "coder": "declared", "embed": "declared"}
    gpus.close()
