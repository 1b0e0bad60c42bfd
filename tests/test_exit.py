"""How a program that uses twat-mp ends: quickly and quietly after an error, an
abandoned lazy map, Ctrl-C, or its own death, with no worker left behind (sync and
async pools alike)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import wait_gone

PRELUDE = textwrap.dedent("""
    import asyncio, os, sys, time
    from twat_mp import apmap, imap, pmap

    def fail_on_3(x):
        if x == 3:
            raise ValueError("boom")
        return x

    async def async_fail_on_3(x):
        await asyncio.sleep(0.01)
        if x == 3:
            raise ValueError("boom")
        return x

    async def slow(x):
        await asyncio.sleep(30)
        return x

    def slow_sync(x):
        time.sleep(30)
        return x
""")


def start(body: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TWAT_MP_DEBUG", None)
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def descendants(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def finish(proc: subprocess.Popen[str], within: float) -> tuple[str, str, float]:
    begin = time.monotonic()
    try:
        out, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the script did not exit within {within}s\nstdout:{out}\nstderr:{err[-3000:]}")
    return out, err, time.monotonic() - begin


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", [
    "pmap(fail_on_3)(range(300))",
    "apmap(async_fail_on_3).sync(range(300))",
    "asyncio.run(apmap(async_fail_on_3)(range(300)))",
])
def test_exit_right_after_an_error_is_quick_and_says_only_the_error(call):
    proc = start(f"""
        try:
            {call}
        except ValueError:
            print("caught", flush=True)
        print("end", time.monotonic(), flush=True)
    """)
    out, err, _ = finish(proc, 30)
    exited = time.monotonic()
    assert proc.returncode == 0, err
    assert "caught" in out
    assert err == "", err  # no "Exception ignored", no "process object is closed"
    assert exited - float(out.split("end ")[1]) < 1.5  # the bound is 1 s; a loaded CI gets slack


@pytest.mark.timeout(60)
def test_exit_after_an_error_takes_under_a_second():
    proc = start("""
        t0 = time.monotonic()
        pmap(fail_on_3)(range(300))  # raises: the program ends with the traceback
    """)
    _, err, _ = finish(proc, 30)
    assert proc.returncode == 1
    assert "ValueError: boom" in err
    assert "Exception ignored" not in err and "closed" not in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_abandoned_lazy_map_at_exit_is_quiet_and_quick(kind):
    call = "list(imap(slow_sync)(iter(range(1000))))" if kind == "sync" else "apmap(slow).sync(range(1000))"
    proc = start(f"""
        from twat_mp import ProcessPool
        pool = ProcessPool(nodes=2).__enter__()
        lazy = pool.imap(abs, iter(range(10**7)))
        next(lazy)
        import threading
        threading.Thread(target=lambda: {call}, daemon=True).start()
        time.sleep(0.5)  # the thread's map is under way (any moment will do)
        print("ready", time.monotonic(), flush=True)
    """)
    out, err, _ = finish(proc, 30)
    assert proc.returncode == 0, err
    assert err == "", err
    started = float(out.split()[1])
    assert time.monotonic() - started < 5  # generous: includes the interpreter's own exit


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", [
    "pmap(slow_sync)(range(300))",
    "apmap(slow).sync(range(300))",
    "asyncio.run(apmap(slow)(range(300)))",
])
def test_one_ctrl_c_stops_a_running_map_and_the_program(call):
    proc = start(f"""
        print("pid", os.getpid(), flush=True)
        {call}
    """)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("pid")
    deadline = time.monotonic() + 20
    while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:  # workers running
        time.sleep(0.02)
    workers = descendants(proc.pid)
    assert workers
    time.sleep(0.3)  # let the map get going (not a synchronisation: any moment will do)
    proc.send_signal(signal.SIGINT)
    _, err, took = finish(proc, 20)
    assert "KeyboardInterrupt" in err
    assert took < 5
    assert not wait_gone(workers, within=5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["pmap(slow_sync)(range(300))", "apmap(slow).sync(range(300))"])
def test_workers_go_when_their_parent_is_killed(call):
    proc = start(f"""
        print("pid", os.getpid(), flush=True)
        {call}
    """)
    assert proc.stdout is not None
    proc.stdout.readline()
    deadline = time.monotonic() + 20
    while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = descendants(proc.pid)
    assert workers
    proc.kill()
    proc.communicate()
    assert not wait_gone(workers, within=5)
