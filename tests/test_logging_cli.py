from __future__ import annotations

import os
import subprocess
import sys

from loguru import logger

import twat_mp
from twat_mp import ProcessPool, set_debug_mode
from twat_mp.cli import main


def test_logging_is_silent_by_default_and_debug_mode_turns_it_on():
    messages: list[str] = []
    sink = logger.add(messages.append, level="DEBUG")
    try:
        with ProcessPool(nodes=1) as pool:
            pool.map(abs, [1])
        assert not [m for m in messages if "ProcessPool" in m]
        set_debug_mode(True)
        with ProcessPool(nodes=1) as pool:
            pool.map(abs, [1])
        assert any("starting ProcessPool" in m for m in messages)
    finally:
        set_debug_mode(False)
        logger.remove(sink)


def test_env_variable_turns_on_debug_logs():
    code = "from twat_mp import ProcessPool\nwith ProcessPool(nodes=1) as p: p.map(abs, [1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TWAT_MP_DEBUG": "1"})
    assert out.returncode == 0, out.stderr
    assert "starting ProcessPool" in out.stderr
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "TWAT_MP_DEBUG"})
    assert quiet.stderr == ""


def test_cli_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == twat_mp.__version__


def test_cli_demo_runs_every_decorator_and_pool():
    out = subprocess.run([sys.executable, "-m", "twat_mp", "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for label in ["@pmap", "@imap", "@amap", "@apmap", "ProcessPool", "ThreadPool", "AsyncMultiPool", "x serial"]:
        assert label in out.stdout
