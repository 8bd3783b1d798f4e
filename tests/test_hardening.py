"""Hardening (issue 10): reloads applied in one step, keep_alive beyond any date, backends reaped by
session, one proxy per state folder, key-file errors without keys, files that vanish or go empty,
bounded backend output, summaries for clients and tails for admins, one retry of a dead connection.

The manager's rules run with its in-memory process and fake clock; everything else runs the real
proxy.py, the real supervisor and real child processes, with the OS process table as the judge.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from proxy.auth import load_keys
from proxy.backends import LaunchPlan
from proxy.config import load_config
from proxy.errors import UnknownModel
from proxy.manager import ModelManager, State
from proxy.sessions import SPAWN_MARK, ChildRegistry
from proxy.supervisor import LINE_BYTES, TAIL_LINES, BackendProcess, spawn
from tests.conftest import (
    ADMIN_KEY, API_KEY, FAKE_BACKEND, ROOT, ProxyProcess, fake_profile, free_port, wait_until, write_config,
)
from tests.test_manager import FakeClock, FakeLauncher, make_config, state

Start = Callable[..., ProxyProcess]
HUGE_KEEP_ALIVES = [1e12, 1e308, "100000000h"]


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ----- High 4: a reload is applied in one step ------------------------------------------------------

def test_reload_removing_an_unloaded_profile_and_adding_another_applies_whole(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, loaded={}, idle={}, edited={}), launcher, clock)
    try:
        manager.acquire("loaded", timeout_s=5).release()
        (tmp_path / "model_configs" / "idle.yml").unlink()
        new = make_config(tmp_path, loaded={}, edited={"unload_timer": 7}, added={})

        assert manager.reload(new) == []  # nothing loaded changed: nothing restarts

        with pytest.raises(UnknownModel):
            manager.acquire("idle", timeout_s=1)
        assert {status.name for status in manager.snapshot()} == {"loaded", "edited", "added"}
        manager.acquire("added", timeout_s=5).release()
        manager.acquire("edited", timeout_s=5).release()
        assert launcher.last("edited").model.unload_timer_s == 7
        assert state(manager, "loaded") is State.STOPPED  # swapped out (one slot), never restarted by the reload
        assert launcher.count("loaded") == 1
    finally:
        manager.shutdown()


def test_a_profile_removed_while_loaded_and_added_back_answers_again(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, back={}), launcher, clock)
    try:
        lease = manager.acquire("back", timeout_s=5)
        profile = (tmp_path / "model_configs" / "back.yml").read_text()
        (tmp_path / "model_configs" / "back.yml").unlink()
        assert manager.reload(load_config(tmp_path / "config.yml")) == ["back"]
        (tmp_path / "model_configs" / "back.yml").write_text(profile)
        assert manager.reload(load_config(tmp_path / "config.yml")) == []  # the same profile: keep it running

        manager.acquire("back", timeout_s=5).release()
        lease.release()
        assert launcher.count("back") == 1
    finally:
        manager.shutdown()


def test_sighup_and_post_reload_remove_an_unloaded_profile_and_add_another(start_proxy: Start) -> None:
    proxy = start_proxy({"kept": fake_profile(), "idle": fake_profile(), "spare": fake_profile()})
    assert proxy.chat("kept").status_code == 200
    profiles = proxy.config_path.parent / "model_configs"

    (profiles / "fresh.yml").write_text(yaml.safe_dump(fake_profile()))
    (profiles / "idle.yml").unlink()
    proxy.popen.send_signal(signal.SIGHUP)
    proxy.wait_for(lambda: "config reloaded" in proxy.log(), timeout_s=10, what="the SIGHUP reload")
    assert proxy.chat("fresh").status_code == 200
    assert proxy.chat("idle").status_code == 404
    assert proxy.chat("kept").status_code == 200

    (profiles / "newer.yml").write_text(yaml.safe_dump(fake_profile()))
    (profiles / "spare.yml").unlink()
    reloaded = proxy.post("/reload", admin=True)
    assert reloaded.status_code == 200, reloaded.text
    assert sorted(reloaded.json()["models"]) == ["fresh", "kept", "newer"]
    assert proxy.chat("newer").status_code == 200
    assert proxy.chat("spare").status_code == 404
    assert "Traceback" not in proxy.log()


# ----- Medium 5: keep_alive beyond any date means never --------------------------------------------

@pytest.mark.parametrize("keep_alive_s", [1e12, 1e308])
def test_keep_alive_beyond_a_date_means_never_in_the_snapshot(
        tmp_path: Path, launcher: FakeLauncher, clock: FakeClock, keep_alive_s: float) -> None:
    manager = ModelManager(make_config(tmp_path, alpha={}), launcher, clock)
    try:
        manager.acquire("alpha", keep_alive_s=keep_alive_s, timeout_s=5).release()
        [status] = manager.snapshot()
        assert status.keep_alive_s == math.inf and status.expires_at is None
        clock.advance(1e9)
        assert manager.expire_idle() == math.inf and state(manager, "alpha") is State.READY
    finally:
        manager.shutdown()


def test_an_unload_timer_beyond_a_date_means_never(tmp_path: Path, launcher: FakeLauncher, clock: FakeClock) -> None:
    manager = ModelManager(make_config(tmp_path, alpha={"unload_timer": 1e12}), launcher, clock)
    try:
        manager.acquire("alpha", timeout_s=5).release()
        [status] = manager.snapshot()
        assert status.keep_alive_s == math.inf and status.expires_at is None
    finally:
        manager.shutdown()


@pytest.mark.parametrize("keep_alive", HUGE_KEEP_ALIVES, ids=["1e12", "1e308", "100000000h"])
def test_views_answer_after_a_keep_alive_beyond_a_date(start_proxy: Start, keep_alive: object) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    assert proxy.chat("fake", keep_alive=keep_alive).status_code == 200
    for path in ("/status", "/v1/models", "/api/ps"):
        assert proxy.get(path).status_code == 200, path
    assert proxy.status("fake")["unloads"] == "never" and proxy.status("fake")["expires_at"] is None
    [running] = proxy.get("/api/ps").json()["models"]
    assert running["expires_at"].startswith("2")  # now + Ollama's forever (about 292 years)


# ----- Medium 10 and Low: the key file and config.yml: errors without keys, vanished, emptied, not UTF-8 -------

LEAKY_ADMIN_KEY = "leaky-admin-key-must-not-be-logged-0123"


def run_proxy(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run proxy.py to its exit (for starts that must fail); return its status and output."""
    return subprocess.run([sys.executable, str(ROOT / "proxy.py"), "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=config_path.parent)


def test_a_yaml_typo_in_the_key_file_is_reported_by_line_without_its_keys(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {"fake": fake_profile()})
    (tmp_path / "api_tokens.yml").write_text(f"api_key: {API_KEY}\nadmin_key: {LEAKY_ADMIN_KEY}: oops\n")

    started = run_proxy(config_path, "--port", str(free_port()))

    assert started.returncode == 2
    output = started.stdout + started.stderr
    assert LEAKY_ADMIN_KEY not in output and API_KEY not in output
    assert "api_tokens.yml: invalid YAML at line 2, column" in output
    assert "Traceback" not in output


def test_a_yaml_typo_in_the_key_file_on_reload_keeps_the_keys_and_logs_no_key(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    tokens = proxy.config_path.parent / "api_tokens.yml"
    tokens.write_text(f"api_key: {API_KEY}\nadmin_key: \"{LEAKY_ADMIN_KEY}\n  - [unclosed\n")

    assert proxy.post("/reload", admin=True).status_code == 400
    assert proxy.get("/v1/models").status_code == 200  # the running keys still work
    assert "invalid YAML at line" in proxy.log()
    assert LEAKY_ADMIN_KEY not in proxy.log()


def test_a_vanished_key_file_or_an_emptied_config_keeps_the_running_ones(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()}, proxy={"max_loaded_models": 2})
    directory = proxy.config_path.parent
    tokens = directory / "api_tokens.yml"
    saved = tokens.read_text()

    tokens.unlink()
    proxy.wait_for(lambda: "api_tokens.yml: file not found" in proxy.log(), timeout_s=10, what="the refused reload")
    assert proxy.post("/reload", admin=True).status_code == 400
    assert not tokens.exists()  # no new random keys behind the operator's back
    assert proxy.get("/v1/models").status_code == 200

    tokens.write_text(saved)
    proxy.config_path.write_text("")
    proxy.wait_for(lambda: "config.yml: the file is empty" in proxy.log(), timeout_s=10, what="the refused reload")
    assert proxy.post("/reload", admin=True).status_code == 400
    status = proxy.get("/status").json()
    assert status["max_loaded_models"] == 2  # not reset to the default 1
    assert proxy.chat("fake").status_code == 200


@pytest.mark.parametrize("which", ["config.yml", "api_tokens.yml", "model_configs/fake.yml"])
def test_a_file_that_is_not_utf8_is_a_config_error_with_status_2(tmp_path: Path, which: str) -> None:
    config_path = write_config(tmp_path, {"fake": fake_profile()})
    path = tmp_path / which
    path.write_bytes(path.read_bytes() + b"\n# caf\xe9 \xff\n")

    started = run_proxy(config_path, "--port", str(free_port()))

    assert started.returncode == 2, started.stderr
    assert f"config error: {path}: not valid UTF-8 (byte" in started.stderr
    assert "Traceback" not in started.stderr


def test_a_file_that_is_not_utf8_on_reload_is_a_400_and_keeps_the_config(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    proxy.config_path.write_bytes(proxy.config_path.read_bytes() + b"\n# \xff\n")

    answer = proxy.post("/reload", admin=True)

    assert answer.status_code == 400, answer.text
    assert proxy.chat("fake").status_code == 200
    assert "Traceback" not in proxy.log()


# ----- Low: the keys CLI under concurrent use ---------------------------------------------------------------

def test_parallel_key_additions_all_land_and_every_printed_key_works(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {})
    names = [f"user{index}" for index in range(10)]
    runs = [subprocess.Popen([sys.executable, str(ROOT / "proxy.py"), "--config", str(config_path), "keys", "add", name],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    printed = {}
    for name, run in zip(names, runs):
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        printed[name] = out.strip()

    keys = {entry.name: entry.key for entry in load_keys(tmp_path / "api_tokens.yml").entries}
    assert {name: keys.get(name) for name in names} == printed
    assert keys["admin_key"] == ADMIN_KEY and keys["api_key"] == API_KEY


# ----- Medium 8: a backend's whole session is stopped, and reaped after a crash -----------------------------

# `sh -c '"$0" "$@" & wait' python fake_backend.py ...`: the server is the wrapper's child, not ours.
WRAP = ["sh", "-c", '"$0" "$@" & wait']
# A wrapper that puts the server in a process group of its own (the same session), as job control does.
WRAP_OWN_GROUP = ["${PYTHON}", "-c", "import subprocess, sys; subprocess.Popen(sys.argv[1:], process_group=0).wait()"]


def wrapped_profile(wrapper: list[str] = WRAP, *flags: str, **settings: Any) -> dict[str, Any]:
    cmd = [*wrapper, "${PYTHON}", str(FAKE_BACKEND), "--port", "${PORT}", "--model", "${MODEL}", *flags]
    return {"backend": "command", "command": {"cmd": cmd}, **settings}


def server_of(proxy: ProxyProcess) -> psutil.Process:
    """Return the fake backend running under the proxy's wrapper shell (a grandchild of the proxy)."""
    [server] = [process for process in proxy.backends() if process.cmdline()[1:2] == [str(FAKE_BACKEND)]]
    assert server.ppid() != proxy.popen.pid  # the wrapper's child, not the proxy's
    return server


def is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_restarted_proxy_reaps_a_wrapped_backend_whose_wrapper_died_with_the_old_one(start_proxy: Start) -> None:
    first = start_proxy({"wrapped": wrapped_profile()})
    assert first.chat("wrapped").status_code == 200
    server = server_of(first)

    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(10)
    # The parent-death signal took the wrapper; the server it started outlives the proxy.
    wait_until(lambda: len([p for p in psutil.process_iter() if p.pid in first.seen_backends and is_running(p)]) <= 1,
               what="the wrapper to die with the proxy")
    assert is_running(server)

    second = ProxyProcess(first.config_path, free_port())  # the same state_dir
    try:
        second.wait_healthy()
        assert not is_running(server), "the restarted proxy left the old backend running"
        assert f"left running by a previous proxy: pids [{server.pid}]" in second.log()
        assert second.chat("wrapped").status_code == 200
    finally:
        second.stop()
        second.kill_leftovers()
    assert not is_running(server)


@pytest.mark.parametrize("wrapper", [WRAP, WRAP_OWN_GROUP], ids=["same-group", "own-group"])
def test_no_process_of_a_backend_session_outlives_a_normal_stop(start_proxy: Start, wrapper: list[str]) -> None:
    proxy = start_proxy({"wrapped": wrapped_profile(wrapper, "--ignore-sigterm")}, proxy={"stop_grace": 1})
    assert proxy.chat("wrapped").status_code == 200
    server = server_of(proxy)
    leader = proxy.status("wrapped")["pid"]
    assert (os.getsid(server.pid), os.getpgid(server.pid) == leader) == (leader, wrapper is WRAP)

    assert proxy.stop() == 0

    assert not is_running(server)  # gone when the proxy exits, not some time later
    assert proxy.surviving_backends() == []


def test_a_wrapper_that_exits_takes_what_it_started_with_it(start_proxy: Start, tmp_path: Path) -> None:
    flag = tmp_path / "wrapper-may-exit"
    script = f'"$0" "$@" & while [ ! -e {flag} ]; do sleep 0.05; done; exit 7'
    proxy = start_proxy({"wrapped": wrapped_profile(["sh", "-c", script])})
    assert proxy.chat("wrapped").status_code == 200
    server = server_of(proxy)

    flag.touch()

    proxy.wait_for(lambda: proxy.status("wrapped")["state"] == "stopped", what="the exit to be noticed")
    assert not is_running(server)
    assert "exited unexpectedly" in proxy.status("wrapped")["last_error"]
    flag.unlink()
    assert proxy.chat("wrapped").status_code == 200  # restarted on the next request


MEMBER_PRINTER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def start_session(env: dict[str, str], started: list[psutil.Process]) -> tuple[subprocess.Popen[bytes], int]:
    """Start a session leader that starts a member of its session; return the leader and the member's PID."""
    leader = subprocess.Popen([sys.executable, "-c", MEMBER_PRINTER], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env})
    assert leader.stdout is not None
    member = int(leader.stdout.readline())
    started += [psutil.Process(leader.pid), psutil.Process(member)]
    return leader, member


@pytest.fixture
def sessions() -> Iterator[list[psutil.Process]]:
    """Processes a test starts; killed by PID (if still the same process) afterwards."""
    started: list[psutil.Process] = []
    yield started
    for process in started:
        if is_running(process):
            process.kill()


def test_reap_stale_kills_the_members_of_a_session_whose_leader_is_gone(
        tmp_path: Path, sessions: list[psutil.Process]) -> None:
    path = tmp_path / "backends.json"
    leader, member = start_session({SPAWN_MARK: "mark-of-this-spawn"}, sessions)
    ChildRegistry(path).add(leader.pid, "wrapped", mark="mark-of-this-spawn")
    leader.kill()
    leader.wait(5)

    assert ChildRegistry(path).reap_stale(grace_s=2) == [member]
    wait_until(lambda: not is_running(sessions[1]), what="the member to die")


@pytest.mark.parametrize("tamper", ["other-mark", "other-boot", "older-format"])
def test_reap_stale_leaves_a_session_it_cannot_prove_is_ours_alone(
        tmp_path: Path, sessions: list[psutil.Process], tamper: str) -> None:
    path = tmp_path / "backends.json"
    leader, member = start_session({SPAWN_MARK: "someone-else"}, sessions)
    ChildRegistry(path).add(leader.pid, "wrapped", mark="mark-of-this-spawn")
    recorded = json.loads(path.read_text())
    entry = recorded[str(leader.pid)]
    if tamper == "other-mark":
        pass  # the survivor carries another spawn's mark: a reused session number
    elif tamper == "other-boot":
        entry["mark"] = "someone-else"
        entry["boot_id"] = "a-boot-long-ago"
    else:
        entry = {"model": "wrapped", "start_ticks": entry["start_ticks"]}
        recorded[str(leader.pid)] = entry
    path.write_text(json.dumps(recorded))
    leader.kill()
    leader.wait(5)

    assert ChildRegistry(path).reap_stale(grace_s=0.5) == []
    assert is_running(sessions[1])


# ----- Medium 9: one proxy per state folder; a port in use -------------------------------------------------

def test_a_second_proxy_on_the_same_state_dir_exits_2_and_touches_nothing(start_proxy: Start) -> None:
    first = start_proxy({"fake": fake_profile()})
    assert first.chat("fake").status_code == 200
    pid = first.status("fake")["pid"]
    registry = (first.config_path.parent / "run" / "backends.json").read_text()

    second = run_proxy(first.config_path, "--port", str(free_port()))

    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert lines[-1] == (f"error: {first.config_path.parent / 'run'} is in use by another proxy "
                         f"(pid {first.popen.pid}); stop it, or give this one its own proxy.state_dir")
    assert "Traceback" not in second.stderr and "stopping" not in second.stderr
    assert first.status("fake")["pid"] == pid and first.chat("fake").status_code == 200
    assert (first.config_path.parent / "run" / "backends.json").read_text() == registry


def test_a_port_already_in_use_is_a_one_line_error_with_status_2(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {"fake": fake_profile()})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        started = run_proxy(config_path, "--port", str(port))

    assert started.returncode == 2
    assert "Traceback" not in started.stderr
    assert started.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


# ----- Low: backend output in bounded pieces; the log rotates while the backend runs -------------------------

def silent_plan(code: str) -> LaunchPlan:
    return LaunchPlan(argv=(sys.executable, "-c", code), port=1, probe=lambda: False)


@pytest.fixture
def spawned() -> Iterator[list[BackendProcess]]:
    processes: list[BackendProcess] = []
    yield processes
    for process in processes:
        process.stop(grace_s=1)


def test_output_without_newlines_reaches_the_log_and_the_tail_in_bounded_pieces(
        tmp_path: Path, spawned: list[BackendProcess]) -> None:
    size = 4 * 1024 * 1024
    code = f"import sys, time; sys.stdout.write('x' * {size} + '50%\\r' + '100%\\r'); sys.stdout.flush(); time.sleep(60)"
    process = spawn("progress", silent_plan(code), log_dir=tmp_path, on_exit=lambda p, code: None)
    spawned.append(process)

    wait_until(lambda: process.tail(1) == "100%", timeout_s=10, what="the progress bar in the tail")
    assert process.is_alive()
    assert len(process.tail(TAIL_LINES)) <= TAIL_LINES * (LINE_BYTES + 1)
    assert (tmp_path / "progress.log").read_bytes().endswith(b"x" * 1000 + b"50%\r100%\r")


def test_a_running_backends_log_is_rotated_when_it_grows_too_big(tmp_path: Path, spawned: list[BackendProcess]) -> None:
    code = "import time\nfor i in range(4000): print('line', i, 'x' * 90, flush=True)\ntime.sleep(60)"
    process = spawn("chatty", silent_plan(code), log_dir=tmp_path, on_exit=lambda p, code: None,
                    log_rotate_bytes=100_000)
    spawned.append(process)

    wait_until(lambda: "line 3999" in process.tail(), timeout_s=10, what="all the output")
    assert process.is_alive()
    assert (tmp_path / "chatty.log.1").exists()
    assert (tmp_path / "chatty.log").stat().st_size <= 100_000
    assert b"line 3999 " in (tmp_path / "chatty.log").read_bytes()


# ----- Low: clients get a summary of a failed start, admins and the log the output tail ----------------------

def test_a_failed_start_shows_its_output_to_admins_and_the_log_only(start_proxy: Start) -> None:
    proxy = start_proxy({"dies": fake_profile("--exit-during-startup")})

    answers = [proxy.chat("dies"), proxy.post("/api/chat", {"model": "dies", "messages": [{"role": "user", "content": "hi"}]})]

    for answer in answers:  # clients get the reason, the output's last error line, and nothing else of it
        assert answer.status_code == 502
        assert "code 3" in answer.text and "fatal: simulated start failure" in answer.text
        assert "fake_backend.py" not in answer.text and "--port" not in answer.text  # never argv or paths
    [client_view] = proxy.get("/status").json()["models"]
    assert "code 3" in client_view["last_error"] and client_view["last_output"] is None
    assert "fake_backend.py" not in json.dumps(client_view)
    [admin_view] = proxy.get("/status", admin=True).json()["models"]
    assert "fatal: simulated start failure" in admin_view["last_output"]
    assert "fatal: simulated start failure" in proxy.log()


def test_a_missing_program_names_the_path_to_admins_only(start_proxy: Start, tmp_path: Path) -> None:
    missing = str(tmp_path / "secret-dir" / "no-such-server")
    proxy = start_proxy({"ghost": {"backend": "command", "command": {"cmd": [missing, "--port", "${PORT}"]}}})

    answer = proxy.chat("ghost")

    assert answer.status_code == 502 and "secret-dir" not in answer.text
    assert "secret-dir" not in proxy.get("/status").text
    assert missing in proxy.get("/status", admin=True).json()["models"][0]["last_output"]


# ----- Low: a connection reset before any byte of an answer is retried once --------------------------------

FLAKY_BACKEND = r'''
import json, socket, struct, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, mode = int(sys.argv[1]), sys.argv[2]
posts = []

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer(200, {"posts": len(posts)} if self.path == "/posts" else {"status": "ok"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        posts.append(self.path)
        if len(posts) == 1 and mode != "never":
            if mode == "after-headers":  # the answer has begun: no retry may follow
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{")
                self.wfile.flush()
            # SO_LINGER 0: close with a reset, as a backend that dropped an idle pooled connection does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.answer(200, {"id": "x", "object": "chat.completion", "model": "flaky",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                       "finish_reason": "stop"}]})

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def flaky_profile(mode: str) -> dict[str, Any]:
    return {"backend": "command", "command": {"cmd": ["${PYTHON}", "-c", FLAKY_BACKEND, "${PORT}", mode]}}


def backend_posts(proxy: ProxyProcess, name: str) -> int:
    port = proxy.status(name)["port"]
    return int(proxy.http.get(f"http://127.0.0.1:{port}/posts", timeout=5).json()["posts"])


def test_a_connection_reset_before_any_answer_is_sent_once_more(start_proxy: Start) -> None:
    proxy = start_proxy({"flaky": flaky_profile("reset-first")})

    answer = proxy.chat("flaky")

    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "hi"
    assert backend_posts(proxy, "flaky") == 2
    assert "reset before any answer" in proxy.log()


def test_a_reset_after_the_answer_began_is_not_sent_again(start_proxy: Start) -> None:
    proxy = start_proxy({"flaky": flaky_profile("after-headers")})

    answer = proxy.chat("flaky")

    assert answer.status_code == 502
    assert backend_posts(proxy, "flaky") == 1
