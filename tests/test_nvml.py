"""proxy/nvml.py against the fake NVML (tests/fake_nvml), with real processes holding fake VRAM:
tests/fake_backend.py --vram, and forked children for process groups. Also the fake backend's
out-of-memory exit and its reading of CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from proxy.nvml import Device, Gpus, _Nvml
from tests.conftest import FAKE_BACKEND, ROOT, free_port, wait_until
from tests.fake_backend import parse_size, parse_vram
from tests.fake_nvml import fake_gpu

FAKE_NVML = ROOT / "tests" / "fake_nvml"
MiB = 1024 ** 2
GiB = 1024 ** 3
GPU_LOST = 15  # NVML_ERROR_GPU_IS_LOST

@pytest.fixture
def gpu_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two fake GPUs: 24 GiB free, and 16 GiB with 1 GiB held by someone else's process."""
    directory = fake_gpu.setup(tmp_path / "gpus", [
        {"total": 24 * GiB}, {"total": 16 * GiB, "name": "Fake GPU 1", "other_used": GiB}])
    monkeypatch.setenv(fake_gpu.ENV, str(directory))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return directory


@pytest.fixture
def fake_pynvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_fake_pynvml(monkeypatch)


def load_fake_pynvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Make the fake `pynvml` for this test only: sys.modules gets its old entries back afterwards."""
    monkeypatch.setitem(sys.modules, "fake_gpu", fake_gpu)  # the fake's `import fake_gpu`: this very module
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpus(gpu_dir: Path, fake_pynvml: ModuleType) -> Iterator[Gpus]:
    opened = Gpus.open()
    assert opened is not None
    yield opened
    opened.close()


class Children:
    """Children of this test, each in its own session, and the PIDs of their own children."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []
        self.grandchildren: list[int] = []

    def start(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True, env={**os.environ, **(env or {})})
        self.started.append(child)
        return child

    def stop(self) -> None:
        """Kill each child's process group (the child's own PID) and each grandchild by its PID (one
        may have a group of its own); check that all are gone."""
        for pid in self.grandchildren:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for child in self.started:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            child.communicate(timeout=5)
        wait_until(lambda: not any(map(fake_gpu.is_alive, self.grandchildren)), what="grandchildren to exit")


@pytest.fixture
def children() -> Iterator[Children]:
    started = Children()
    yield started
    started.stop()


def start_backend(children: Children, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return children.start(str(FAKE_BACKEND), "--port", str(free_port()), "--model", "fake-vram", *flags, env=env)


def wait_registered(child: subprocess.Popen[str]) -> None:
    """Wait until a fake backend has taken its VRAM (it says so on stdout before serving)."""
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.startswith("vram: "), f"fake backend exited {child.poll()}: {line}{child.communicate()[1]}"


FORKING_CHILD = """
import os, sys, time
pid = os.fork()
if pid == 0:
    if len(sys.argv) > 1:
        os.setpgid(0, 0)  # a group of its own, still in its parent's session
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""


# ---- without NVML ------------------------------------------------------------------------------

def test_open_is_none_without_the_driver(monkeypatch: pytest.MonkeyPatch, fake_pynvml: ModuleType,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(fake_gpu.ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="proxy.nvml"):
        assert Gpus.open() is None
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "NVML Shared Library Not Found" in caplog.text


def test_open_is_none_without_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_pynvml: ModuleType,
                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(fake_gpu.ENV, str(tmp_path))  # no devices.json
    with caplog.at_level(logging.INFO, logger="proxy.nvml"):
        assert Gpus.open() is None
    assert "Driver Not Loaded" in caplog.text


def test_open_is_none_without_the_module(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with caplog.at_level(logging.INFO, logger="proxy.nvml"):
        assert Gpus.open() is None
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "nvidia-ml-py" in caplog.text


# ---- devices and usage -------------------------------------------------------------------------

def test_devices_report_each_gpu_memory(gpus: Gpus) -> None:
    assert gpus.devices() == [Device(0, "Fake GPU 0", 24 * GiB, 24 * GiB, 0),
                              Device(1, "Fake GPU 1", 16 * GiB, 15 * GiB, GiB)]


def test_a_hand_written_devices_json_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               fake_pynvml: ModuleType) -> None:
    (tmp_path / "devices.json").write_text('[{"name": "Fake GPU 0", "total": 25769803776, "other_used": 0}, '
                                           '{"total": 1073741824}]')
    monkeypatch.setenv(fake_gpu.ENV, str(tmp_path))  # no procs/ folder either
    gpus = Gpus.open()
    assert gpus is not None
    try:
        assert gpus.devices() == [Device(0, "Fake GPU 0", 24 * GiB, 24 * GiB, 0), Device(1, "Fake GPU 1", GiB, GiB, 0)]
        assert gpus.usage([os.getpid()]) == {}
    finally:
        gpus.close()


def test_usage_counts_a_backend_process_and_free_memory_drops(gpus: Gpus, children: Children) -> None:
    backend = start_backend(children, "--vram", "0:1GiB,1:512MiB")
    wait_registered(backend)

    assert gpus.usage([backend.pid]) == {0: GiB, 1: 512 * MiB}
    assert [device.free for device in gpus.devices()] == [23 * GiB, 15 * GiB - 512 * MiB]
    assert gpus.usage([os.getpid()]) == {}  # a process that holds nothing is on no device


def test_usage_sums_processes_and_counts_each_once(gpus: Gpus, children: Children) -> None:
    one = children.start("-c", "import time; time.sleep(60)")
    two = children.start("-c", "import time; time.sleep(60)")
    fake_gpu.register(one.pid, {0: GiB}, kind="both")  # listed as compute and as graphics
    fake_gpu.register(two.pid, {0: 2 * GiB, 1: None}, kind="graphics")  # None: the driver cannot tell

    assert gpus.usage([one.pid, two.pid]) == {0: 3 * GiB, 1: 0}
    assert gpus.usage([one.pid]) == {0: GiB}
    assert gpus.devices()[0].used == 3 * GiB


def test_group_usage_counts_a_childs_children(gpus: Gpus, children: Children) -> None:
    leader = children.start("-c", FORKING_CHILD)
    own_group = children.start("-c", FORKING_CHILD, "setpgid")
    stranger = children.start("-c", "import time; time.sleep(60)")
    assert leader.stdout is not None and own_group.stdout is not None
    worker, distant = int(leader.stdout.readline()), int(own_group.stdout.readline())
    children.grandchildren += [worker, distant]
    fake_gpu.register(worker, {0: 2 * GiB, 1: GiB})
    fake_gpu.register(leader.pid, {0: 512 * MiB})
    fake_gpu.register(distant, {1: 3 * GiB})
    fake_gpu.register(stranger.pid, {0: 4 * GiB})

    assert gpus.group_usage(leader.pid) == {0: 2 * GiB + 512 * MiB, 1: GiB}
    assert gpus.group_usage(own_group.pid) == {1: 3 * GiB}  # same session, another group
    assert gpus.usage([leader.pid]) == {0: 512 * MiB}       # usage() is only the pids named


def test_group_usage_ignores_processes_that_vanished(gpus: Gpus, children: Children) -> None:
    leader = children.start("-c", "import time; time.sleep(60)")
    gone = children.start("-c", "pass")
    gone.wait(5)
    fake_gpu.register(leader.pid, {0: GiB})
    fake_gpu.register(gone.pid, {0: GiB}, release_s=30)  # still listed by NVML, no longer a process

    assert gpus.group_usage(leader.pid) == {0: GiB}
    assert gpus.usage([gone.pid]) == {0: GiB}


# ---- release -----------------------------------------------------------------------------------

def test_memory_is_free_only_release_s_after_the_backend_exits(gpus: Gpus, children: Children) -> None:
    backend = start_backend(children, "--vram", "2GiB", "--vram-release-s", "1.0")
    wait_registered(backend)
    assert not gpus.wait_for_free({0: 24 * GiB}, timeout_s=0.1, poll_s=0.02)

    backend.send_signal(signal.SIGTERM)
    backend.wait(5)
    noticed = time.monotonic()
    assert not gpus.wait_for_free({0: 24 * GiB}, timeout_s=0.3, poll_s=0.02)
    assert gpus.wait_for_free({0: 24 * GiB}, timeout_s=4.0, poll_s=0.02)
    assert time.monotonic() - noticed >= 0.9
    assert gpus.usage([backend.pid]) == {}


def test_a_zombie_holds_no_memory(gpus: Gpus, children: Children) -> None:
    child = children.start("-c", "import time; time.sleep(60)")
    fake_gpu.register(child.pid, {1: 4 * GiB})
    assert gpus.devices()[1].free == 11 * GiB
    os.kill(child.pid, signal.SIGKILL)  # not reaped yet: a zombie

    assert gpus.wait_for_free({1: 15 * GiB}, timeout_s=4.0, poll_s=0.02)
    assert child.poll() == -signal.SIGKILL


def test_wait_for_free_is_true_at_once_when_memory_is_free(gpus: Gpus) -> None:
    began = time.monotonic()
    assert gpus.wait_for_free({0: 24 * GiB, 1: 15 * GiB}, timeout_s=5.0)
    assert gpus.wait_for_free({})
    assert time.monotonic() - began < 1.0
    assert not gpus.wait_for_free({1: 15 * GiB + 1}, timeout_s=0.1, poll_s=0.02)


# ---- errors ------------------------------------------------------------------------------------

def test_a_failing_device_is_left_out_with_one_warning(gpus: Gpus, gpu_dir: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    fake_gpu.register(os.getpid(), {0: GiB, 1: GiB})
    fake_gpu.set_device(1, gpu_dir, errors={"nvmlDeviceGetMemoryInfo": GPU_LOST})
    with caplog.at_level(logging.WARNING, logger="proxy.nvml"):
        assert [device.index for device in gpus.devices()] == [0]
        assert [device.index for device in gpus.devices()] == [0]
    assert len(caplog.records) == 1 and "GPU 1" in caplog.text and "GPU is lost" in caplog.text
    assert gpus.usage([os.getpid()]) == {0: GiB, 1: GiB}  # its process list still answers

    began = time.monotonic()
    assert not gpus.wait_for_free({1: GiB}, timeout_s=5.0)  # unreadable: no point waiting
    assert time.monotonic() - began < 1.0

    fake_gpu.set_device(1, gpu_dir, errors={"nvmlDeviceGetComputeRunningProcesses": GPU_LOST})
    assert gpus.usage([os.getpid()]) == {0: GiB}
    assert gpus.group_usage(os.getpid()) == {0: GiB}
    assert [device.index for device in gpus.devices()] == [0, 1]

    fake_gpu.set_device(0, gpu_dir, errors={"nvmlDeviceGetHandleByIndex": GPU_LOST})
    fake_gpu.set_device(1, gpu_dir, errors={})
    assert [device.index for device in gpus.devices()] == [1]
    assert gpus.usage([os.getpid()]) == {1: GiB}


def test_close_ends_the_session_and_queries_answer_nothing(gpus: Gpus, fake_pynvml: ModuleType) -> None:
    failures: list[BaseException] = []

    def query() -> None:
        try:
            for _ in range(50):
                gpus.devices()
                gpus.usage([os.getpid()])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=query) for _ in range(4)]
    for thread in threads:
        thread.start()
    gpus.close()
    for thread in threads:
        thread.join(10)
    assert not failures

    assert gpus.devices() == [] and gpus.usage([os.getpid()]) == {} and gpus.group_usage(1) == {}
    assert not gpus.wait_for_free({0: 1})
    gpus.close()  # idempotent
    with pytest.raises(fake_pynvml.NVMLError):  # nvmlShutdown was called: NVML is uninitialised
        fake_pynvml.nvmlDeviceGetCount()


def test_a_proxy_subprocess_finds_the_fake_on_pythonpath(gpu_dir: Path) -> None:
    script = "from proxy.nvml import Gpus; gpus = Gpus.open(); print([d.name for d in gpus.devices()])"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=20,
                            env={**os.environ, "PYTHONPATH": f"{FAKE_NVML}{os.pathsep}{ROOT}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['Fake GPU 0', 'Fake GPU 1']"


def test_the_fake_and_nvidia_ml_py_have_what_proxy_nvml_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module("pynvml")  # nvidia-ml-py's: the fake is not on sys.path here
    fake = load_fake_pynvml(monkeypatch)
    assert Path(real.__file__ or "").parent != FAKE_NVML
    used = set(_Nvml.__annotations__) | {name for name in vars(_Nvml) if name.startswith("nvml")}
    assert {name for name in used if not hasattr(real, name)} == set()
    assert {name for name in used if not hasattr(fake, name)} == set()
    assert {"total", "free", "used"} <= {field for field, _ in real.c_nvmlMemory_t._fields_}
    assert {"pid", "usedGpuMemory"} <= {field for field, _ in real.c_nvmlProcessInfo_t._fields_}
    assert not issubclass(real.NVMLLibraryMismatchError, real.NVMLError)
    assert str(fake.NVMLError(fake.NVML_ERROR_GPU_IS_LOST)) == str(real.NVMLError(real.NVML_ERROR_GPU_IS_LOST))


# ---- the fake backend's VRAM -------------------------------------------------------------------

@pytest.mark.parametrize("visible, vram, usage", [
    (None, "1GiB", {0: GiB}),
    ("1", "1GiB", {1: GiB}),
    ("1,0", "0:1GiB,1:512MiB", {1: GiB, 0: 512 * MiB}),
    ("0,1", "1:2GB", {1: 2 * 1000 ** 3}),
])
def test_fake_backend_takes_vram_on_cuda_visible_devices(gpus: Gpus, children: Children, visible: str | None,
                                                         vram: str, usage: dict[int, int]) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    backend = start_backend(children, "--vram", vram, env=env)
    wait_registered(backend)
    assert gpus.usage([backend.pid]) == usage


@pytest.mark.parametrize("visible, message", [
    (None, "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 24.00 GiB of which 512.00 MiB is free."),
    ("1", "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 16.00 GiB of which 1.50 GiB is free."),
])
def test_fake_backend_exits_out_of_memory_when_the_gpu_is_full(gpus: Gpus, gpu_dir: Path, children: Children,
                                                               visible: str | None, message: str) -> None:
    fake_gpu.set_device(0, gpu_dir, other_used=24 * GiB - 512 * MiB)
    fake_gpu.set_device(1, gpu_dir, other_used=14 * GiB + 512 * MiB)
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    backend = start_backend(children, "--vram", "2GiB", env=env)
    _, stderr = backend.communicate(timeout=10)

    assert backend.returncode == 1
    assert "torch.OutOfMemoryError: CUDA out of memory. " + message in stderr
    assert gpus.usage([backend.pid]) == {}


def test_fake_backend_without_fake_gpus_ignores_vram(children: Children, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fake_gpu.ENV, raising=False)
    backend = start_backend(children, "--vram", "2GiB")
    assert backend.stdout is not None
    assert backend.stdout.readline().startswith("listening ")


@pytest.mark.parametrize("text, size", [
    ("2GiB", 2 * GiB), ("512MiB", 512 * MiB), ("1.5GiB", 3 * GiB // 2), ("1GB", 1000 ** 3),
    ("1048576", MiB), ("64kib", 64 * 1024), ("2 GiB", 2 * GiB),
])
def test_fake_backend_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "2XB", "-1GiB", "inf", "1.5.2GiB"])
def test_fake_backend_rejects_bad_sizes(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_fake_backend_vram_specs() -> None:
    assert parse_vram("2GiB") == {None: 2 * GiB}
    assert parse_vram("0:2GiB,1:1GiB") == {0: 2 * GiB, 1: GiB}
