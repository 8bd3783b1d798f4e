"""proxy/supervisor.py against real child processes: tests/fake_backend.py and small python scripts.

No mocks: every test spawns real processes, and every process is stopped by PID in a fixture or a
finally, whether the test passes or not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_until

from proxy.backends import LaunchPlan, Probe, http_get
from proxy.errors import BackendFailed, BackendTimeout
from proxy.sessions import ChildRegistry, boot_id, process_start_ticks
from proxy.supervisor import BackendProcess, PortPool, port_is_busy, reason_from_output, spawn

ROOT = Path(__file__).resolve().parents[1]
FAKE_BACKEND = ROOT / "tests" / "fake_backend.py"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


# ---- helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def health_probe(port: int) -> Probe:
    """Ready when GET /health answers 200."""

    def probe() -> bool:
        answer = http_get(port, "/health")
        return answer is not None and answer[0] == 200

    return probe


def is_gone(pid: int) -> bool:
    """True when the pid is not a running process (absent from the table, or a zombie)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def kill_if_same(pid: int, ticks: int | None) -> None:
    """SIGKILL pid, but only while it is still the process that started at `ticks` (no reused PIDs)."""
    if ticks is not None and process_start_ticks(pid) == ticks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_popen(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        popen.kill()
    popen.wait(5)
    if popen.stdout is not None:
        popen.stdout.close()


class ExitRecorder:
    """An on_exit callback that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[BackendProcess, int]] = []
        self._lock = threading.Lock()

    def __call__(self, process: BackendProcess, returncode: int) -> None:
        with self._lock:
            self.calls.append((process, returncode))

    def codes(self) -> list[int]:
        with self._lock:
            return [code for _, code in self.calls]


class Spawner:
    """Spawns fake backends through the real supervisor and stops them all at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[BackendProcess] = []
        self.popens: list[subprocess.Popen[bytes]] = []  # raw processes a test started itself
        self.stray: list[tuple[int, int | None]] = []  # (pid, start ticks) of grandchildren and orphans

    def plan(self, *flags: str, model: str = "fake-a", probe: Probe | None = None) -> LaunchPlan:
        port = free_port()
        argv = (sys.executable, str(FAKE_BACKEND), "--port", str(port), "--model", model, *flags)
        return LaunchPlan(argv=argv, port=port, probe=probe or health_probe(port))

    def spawn(self, name: str, plan: LaunchPlan, on_exit: ExitRecorder | None = None,
              registry: ChildRegistry | None = None) -> BackendProcess:
        process = spawn(name, plan, log_dir=self.log_dir, on_exit=on_exit or ExitRecorder(), registry=registry)
        self.started.append(process)
        return process

    def fake(self, name: str, *flags: str, on_exit: ExitRecorder | None = None,
             probe: Probe | None = None) -> BackendProcess:
        return self.spawn(name, self.plan(*flags, model=name, probe=probe), on_exit)

    def close(self) -> None:
        for process in self.started:
            process.stop(grace_s=1.0)
        for popen in self.popens:
            kill_popen(popen)
        for pid, ticks in self.stray:
            kill_if_same(pid, ticks)
        alive = [process.pid for process in self.started if process.is_alive()]
        assert not alive, f"backends still running after teardown: {alive}"


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Spawner]:
    s = Spawner(tmp_path / "logs")
    try:
        yield s
    finally:
        s.close()


# ---- spawn and wait_ready --------------------------------------------------------------------


def test_wait_ready_returns_seconds_and_child_runs_in_own_session(spawner: Spawner) -> None:
    process = spawner.fake("fake-a")
    port = process.port

    took = process.wait_ready(timeout_s=10)

    assert 0 <= took < 10
    assert process.is_alive() and process.returncode is None
    assert process.base_url == f"http://127.0.0.1:{port}"
    assert process.pid == psutil.Process(process.pid).pid
    assert psutil.Process(process.pid).cmdline()[-4:] == ["--port", str(port), "--model", "fake-a"]
    assert http_get(port, "/pid") == (200, {"pid": process.pid})
    assert os.getsid(process.pid) == process.pid
    assert os.getpgid(process.pid) == process.pid


def test_wait_ready_takes_at_least_the_startup_delay(spawner: Spawner) -> None:
    process = spawner.fake("slow", "--startup-delay", "0.5")

    took = process.wait_ready(timeout_s=10)

    assert took >= 0.5
    assert health_probe(process.port)()


def test_child_output_lands_in_log_file_and_tail(spawner: Spawner) -> None:
    process = spawner.fake("logged")
    process.wait_ready(timeout_s=10)
    listening = f"listening 127.0.0.1:{process.port}"

    assert process.log_path == spawner.log_dir / "logged.log"
    wait_until(lambda: listening in process.tail(), what="the listening line in tail()")
    wait_until(lambda: listening in process.log_path.read_text(), what="the listening line in the log file")
    log_text = process.log_path.read_text()
    assert "starting: " in log_text and str(FAKE_BACKEND) in log_text  # the header line names the command
    assert process.tail(lines=1) == process.tail().splitlines()[-1]


def test_exit_during_startup_raises_backend_failed_quickly_with_last_output(spawner: Spawner) -> None:
    process = spawner.fake("doomed", "--exit-during-startup")

    started = time.monotonic()
    with pytest.raises(BackendFailed) as caught:
        process.wait_ready(timeout_s=30)

    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "doomed" in message
    assert "code 3" in message
    assert "simulated start failure" in message
    assert process.returncode == 3


def test_never_ready_probe_raises_backend_timeout_after_timeout(spawner: Spawner) -> None:
    process = spawner.fake("stuck", probe=lambda: False)

    started = time.monotonic()
    with pytest.raises(BackendTimeout) as caught:
        process.wait_ready(timeout_s=0.4)

    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3
    assert "stuck" in str(caught.value)
    assert process.is_alive()  # a timeout does not stop the child; the caller does


def test_spawn_of_missing_executable_raises_backend_failed_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-server")
    plan = LaunchPlan(argv=(missing, "--port", "1"), port=1, probe=lambda: False)

    with pytest.raises(BackendFailed) as caught:
        spawn("ghost", plan, log_dir=tmp_path / "logs", on_exit=ExitRecorder())

    assert missing in str(caught.value)
    assert "ghost" in str(caught.value)


# ---- stop and exit detection -----------------------------------------------------------------


def test_stop_sends_sigterm_and_fake_exits_zero_promptly(spawner: Spawner) -> None:
    exits = ExitRecorder()
    process = spawner.fake("polite", on_exit=exits)
    process.wait_ready(timeout_s=10)
    pid = process.pid

    started = time.monotonic()
    code = process.stop(grace_s=5)

    assert code == 0
    assert time.monotonic() - started < 2
    assert not process.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: gone from the process table
    wait_until(lambda: exits.codes() == [0], what="on_exit(0)")
    time.sleep(0.1)
    assert exits.codes() == [0]
    assert exits.calls[0][0] is process


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(spawner: Spawner) -> None:
    exits = ExitRecorder()
    process = spawner.fake("stubborn", "--ignore-sigterm", on_exit=exits)
    process.wait_ready(timeout_s=10)  # the SIGTERM handler is installed before it listens
    pid = process.pid

    started = time.monotonic()
    code = process.stop(grace_s=0.5)

    elapsed = time.monotonic() - started
    assert code == -signal.SIGKILL
    assert 0.5 <= elapsed < 3
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(pid)
    wait_until(lambda: exits.codes() == [-signal.SIGKILL], what="on_exit(-9)")


def test_stop_on_already_exited_process_returns_its_code(spawner: Spawner) -> None:
    exits = ExitRecorder()
    process = spawner.fake("gone", "--exit-during-startup", on_exit=exits)
    wait_until(lambda: not process.is_alive(), what="the child to exit")

    assert process.stop(grace_s=0.5) == 3
    assert process.stop(grace_s=0.5) == 3  # idempotent
    wait_until(lambda: exits.codes() == [3], what="on_exit(3)")
    time.sleep(0.1)
    assert exits.codes() == [3]


def test_on_exit_called_once_when_child_dies_by_itself(spawner: Spawner) -> None:
    exits = ExitRecorder()
    process = spawner.fake("victim", on_exit=exits)
    process.wait_ready(timeout_s=10)

    os.kill(process.pid, signal.SIGKILL)

    wait_until(lambda: exits.codes() == [-signal.SIGKILL], what="on_exit(-9)")
    assert exits.calls[0][0] is process
    assert not process.is_alive()
    assert process.returncode == -signal.SIGKILL
    process.stop(grace_s=0.5)  # a later stop() does not report the exit again
    time.sleep(0.1)
    assert exits.codes() == [-signal.SIGKILL]


def test_stop_kills_grandchild_in_the_same_process_group(spawner: Spawner) -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('grandchild', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    plan = LaunchPlan(argv=(sys.executable, "-c", code), port=1, probe=lambda: False)
    exits = ExitRecorder()
    process = spawner.spawn("family", plan, on_exit=exits)
    wait_until(lambda: "grandchild" in process.tail(), what="the grandchild's pid")
    grandchild = int(process.tail().split("grandchild")[-1].split()[0])
    spawner.stray.append((grandchild, process_start_ticks(grandchild)))
    assert os.getpgid(grandchild) == process.pid
    assert not is_gone(grandchild)

    process.stop(grace_s=2)

    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)
    wait_until(lambda: is_gone(grandchild), timeout_s=2, what="the grandchild to die")
    # the drain thread ends (and reports the exit) only once the grandchild's copy of the pipe closes
    wait_until(lambda: len(exits.codes()) == 1, what="on_exit")


# ---- PortPool and port_is_busy ---------------------------------------------------------------


def listening_socket(port: int = 0) -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", port))
    server.listen()
    return server


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not port_is_busy(port)


def three_free_ports_after_a_listener() -> tuple[socket.socket, int]:
    """Return a listening socket on port p where p+1 and p+2 are free."""
    for _ in range(50):
        server = listening_socket()
        port = int(server.getsockname()[1])
        if port + 2 <= 65535 and bindable(port + 1) and bindable(port + 2):
            return server, port
        server.close()
    raise AssertionError("no three consecutive free ports found")


def test_port_pool_skips_busy_ports_and_never_hands_out_a_held_port_twice() -> None:
    server, busy = three_free_ports_after_a_listener()
    try:
        pool = PortPool(busy, busy + 2)

        first = pool.reserve()
        second = pool.reserve()

        assert {first, second} == {busy + 1, busy + 2}
        with pytest.raises(BackendFailed):
            pool.reserve()  # busy is listened on, the other two are held

        pool.release(first)
        assert pool.reserve() == first

        server.close()
        assert pool.reserve() == busy  # nothing listens there any more
    finally:
        server.close()


def test_port_pool_exhausted_range_raises_backend_failed() -> None:
    server = listening_socket()
    port = int(server.getsockname()[1])
    try:
        with pytest.raises(BackendFailed) as caught:
            PortPool(port, port).reserve()
        assert str(port) in str(caught.value)
    finally:
        server.close()


def test_port_pool_release_of_unheld_port_is_harmless() -> None:
    port = free_port()
    pool = PortPool(port, port)
    pool.release(port)
    assert pool.reserve() == port
    with pytest.raises(BackendFailed):
        pool.reserve()


def test_port_is_busy_while_listening_and_free_right_after_close() -> None:
    server = listening_socket()
    port = int(server.getsockname()[1])
    try:
        assert port_is_busy(port)
        # Leave a connection in TIME_WAIT: a connect-based check must still call the port free.
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()
        client.close()
    finally:
        server.close()
    assert not port_is_busy(port)


# ---- ChildRegistry ---------------------------------------------------------------------------


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts in their own session; killed (by PID) and reaped afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for popen in started:
            kill_popen(popen)


def start_sleeper(sleepers: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    popen = subprocess.Popen(SLEEPER, start_new_session=True, stdin=subprocess.DEVNULL)
    sleepers.append(popen)
    wait_until(lambda: process_start_ticks(popen.pid) is not None, what="the sleeper to start")
    return popen


def read_registry(path: Path) -> dict[str, dict[str, object]]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def test_registry_add_and_remove_keep_the_file_current(tmp_path: Path,
                                                       sleepers: list[subprocess.Popen[bytes]]) -> None:
    path = tmp_path / "run" / "children.json"
    registry = ChildRegistry(path)
    first, second = start_sleeper(sleepers), start_sleeper(sleepers)

    registry.add(first.pid, "alpha")
    registry.add(second.pid, "beta")

    assert read_registry(path) == {
        str(first.pid): {"model": "alpha", "start_ticks": process_start_ticks(first.pid), "boot_id": boot_id()},
        str(second.pid): {"model": "beta", "start_ticks": process_start_ticks(second.pid), "boot_id": boot_id()},
    }
    registry.remove(first.pid)
    assert list(read_registry(path)) == [str(second.pid)]
    registry.remove(first.pid)  # unknown pid: harmless
    registry.remove(second.pid)
    assert read_registry(path) == {}


def test_spawn_records_child_in_registry_and_drops_it_on_exit(spawner: Spawner, tmp_path: Path) -> None:
    path = tmp_path / "children.json"
    registry = ChildRegistry(path)
    exits = ExitRecorder()
    process = spawner.spawn("recorded", spawner.plan(model="recorded"), on_exit=exits, registry=registry)

    entry = read_registry(path)[str(process.pid)]
    assert entry["model"] == "recorded"
    assert isinstance(entry["start_ticks"], int)

    process.wait_ready(timeout_s=10)
    process.stop(grace_s=2)
    wait_until(lambda: len(exits.codes()) == 1, what="on_exit")
    assert read_registry(path) == {}


def test_reap_stale_kills_recorded_live_process_group(tmp_path: Path,
                                                      sleepers: list[subprocess.Popen[bytes]]) -> None:
    path = tmp_path / "children.json"
    orphan = start_sleeper(sleepers)
    ChildRegistry(path).add(orphan.pid, "left-behind")

    reaped = ChildRegistry(path).reap_stale(grace_s=2)

    assert reaped == [orphan.pid]
    assert orphan.wait(2) == -signal.SIGTERM
    assert read_registry(path) == {}


def test_reap_stale_leaves_process_with_other_start_time_alone(tmp_path: Path,
                                                                sleepers: list[subprocess.Popen[bytes]]) -> None:
    path = tmp_path / "children.json"
    bystander = start_sleeper(sleepers)
    ChildRegistry(path).add(bystander.pid, "reused-pid")
    recorded = read_registry(path)
    ticks = recorded[str(bystander.pid)]["start_ticks"]
    assert isinstance(ticks, int)
    recorded[str(bystander.pid)]["start_ticks"] = ticks + 12345
    path.write_text(json.dumps(recorded))

    reaped = ChildRegistry(path).reap_stale(grace_s=0.5)

    assert reaped == []
    time.sleep(0.1)
    assert bystander.poll() is None
    assert not is_gone(bystander.pid)


def test_reap_stale_skips_processes_that_already_exited(tmp_path: Path,
                                                        sleepers: list[subprocess.Popen[bytes]]) -> None:
    path = tmp_path / "children.json"
    dead = start_sleeper(sleepers)
    ChildRegistry(path).add(dead.pid, "dead")
    dead.kill()
    dead.wait(5)

    assert ChildRegistry(path).reap_stale(grace_s=0.5) == []


def test_reap_stale_with_missing_file_returns_empty(tmp_path: Path) -> None:
    assert ChildRegistry(tmp_path / "absent.json").reap_stale() == []


@pytest.mark.parametrize("content", [
    "",
    "{\"123\": {\"model\": \"x\", \"start",  # a truncated write
    "\x00\x01 garbage",
], ids=["empty", "truncated", "garbage"])
def test_reap_stale_with_unparseable_file_returns_empty(tmp_path: Path, content: str) -> None:
    path = tmp_path / "children.json"
    path.write_text(content)

    assert ChildRegistry(path).reap_stale(grace_s=0.1) == []


@pytest.mark.parametrize("content", [
    "[1, 2, 3]",
    "null",
    "{\"not-a-pid\": {\"model\": \"x\", \"start_ticks\": 1}}",
    "{\"123\": \"not an object\"}",
], ids=["list", "null", "non-numeric-pid", "entry-not-an-object"])
def test_reap_stale_with_valid_json_of_the_wrong_shape_returns_empty(tmp_path: Path, content: str) -> None:
    # proxy.py calls reap_stale() at startup: a registry it cannot read must not stop the proxy starting.
    path = tmp_path / "children.json"
    path.write_text(content)

    assert ChildRegistry(path).reap_stale(grace_s=0.1) == []


# ---- process_start_ticks ---------------------------------------------------------------------


def test_process_start_ticks_of_live_and_dead_processes() -> None:
    mine = process_start_ticks(os.getpid())
    assert isinstance(mine, int) and mine > 0
    assert process_start_ticks(os.getpid()) == mine

    popen = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        popen.wait(10)
    finally:
        kill_popen(popen)
    assert process_start_ticks(popen.pid) is None


def test_process_start_ticks_of_zombie_is_none() -> None:
    popen = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: psutil.Process(popen.pid).status() == psutil.STATUS_ZOMBIE, what="a zombie")
        assert process_start_ticks(popen.pid) is None
    finally:
        kill_popen(popen)


# ---- PR_SET_PDEATHSIG ------------------------------------------------------------------------

INTERMEDIATE = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from proxy.backends import LaunchPlan
from proxy.supervisor import spawn

port = {port}
argv = (sys.executable, {fake!r}, "--port", str(port), "--model", "orphan")
process = spawn("orphan", LaunchPlan(argv=argv, port=port, probe=lambda: False),
                log_dir=Path({log_dir!r}), on_exit=lambda p, code: None)
print(process.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_backend_dies_when_the_proxy_is_killed(spawner: Spawner, tmp_path: Path) -> None:
    code = INTERMEDIATE.format(root=str(ROOT), port=free_port(), fake=str(FAKE_BACKEND),
                               log_dir=str(tmp_path / "orphan-logs"))
    intermediate = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
    spawner.popens.append(intermediate)
    assert intermediate.stdout is not None
    line = intermediate.stdout.readline()
    assert line.strip().isdigit(), f"intermediate printed {line!r}"
    backend = int(line)
    spawner.stray.append((backend, process_start_ticks(backend)))
    assert not is_gone(backend)
    assert psutil.Process(backend).ppid() == intermediate.pid

    intermediate.kill()
    intermediate.wait(5)

    wait_until(lambda: is_gone(backend), timeout_s=2, what="the backend to die with its parent")


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_backend_started_from_a_short_lived_thread_outlives_that_thread(spawner: Spawner) -> None:
    # Linux ties the parent-death signal to the thread that forked: a start run in a thread that
    # then ends (a stream's lease waiter) must not take its backend with it.
    started: list[BackendProcess] = []
    thread = threading.Thread(target=lambda: started.append(spawner.fake("short-lived")))
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and started
    started[0].wait_ready(timeout_s=10)
    time.sleep(0.5)
    assert not is_gone(started[0].pid), "the backend died with the thread that started it"
    assert started[0].wait_ready(timeout_s=2) >= 0  # and it still answers


@pytest.mark.parametrize(("tail", "reason"), [
    ("Traceback (most recent call last):\n  File \"/opt/tabby/common/model.py\", line 68\n"
     "ValueError: Models quantized with 'exl2' are not supported", "ValueError: Models quantized with 'exl2' are not supported"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("ValueError: Failed to load config.json from /srv/models/not-there", "ValueError: Failed to load config.json from …/not-there"),
    ("llama_model_load: error loading model: failed to open /models/x.gguf\nexiting", "llama_model_load: error loading model: failed to open …/x.gguf"),
    ("starting\nlistening", None),
    ("", None),
])
def test_clients_get_the_backends_last_error_line_without_paths(tail: str, reason: str | None) -> None:
    assert reason_from_output(tail) == reason
