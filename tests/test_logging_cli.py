"""Debug logging (lazy loguru, stderr found at write time) and the ``twat-mp`` command, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import twat_mp
from twat_mp import ProcessPool, set_debug_mode
from twat_mp._logging import logger as twat_logger
from twat_mp.cli import main, main_banner

TWAT_MP_BIN = Path(sys.executable).with_name("twat-mp")
QUIET_ENV = {k: v for k, v in os.environ.items() if k not in {"TWAT_MP_DEBUG", "LOGURU_AUTOINIT"}}


def python(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, env=QUIET_ENV if env is None else env)
    assert out.returncode == 0, out.stderr
    return out


def test_logging_is_silent_by_default_and_debug_mode_turns_it_on():
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(messages.append, level="DEBUG", format="{name} | {message}")
    try:
        with ProcessPool(nodes=1) as pool:
            pool.map(abs, [1])
        assert not [m for m in messages if "ProcessPool" in m]
        set_debug_mode(True)
        with ProcessPool(nodes=1) as pool:
            pool.map(abs, [1])
        # the record names the module that logged, not the logging proxy
        assert any(m.startswith("twat_mp.pools | starting ProcessPool") for m in messages), messages
        set_debug_mode(False)
        count = len(messages)
        with ProcessPool(nodes=1) as pool:
            pool.map(abs, [1])
        assert len(messages) == count
    finally:
        set_debug_mode(False)
        logger.remove(sink)


def test_proxy_does_not_format_anything_while_debug_is_off():
    class Unprintable:
        def __format__(self, spec: str) -> str:
            raise AssertionError("formatted while debug mode was off")

        def __repr__(self) -> str:
            return self.__format__("")

        __str__ = __repr__

    set_debug_mode(False)
    for method in (twat_logger.debug, twat_logger.info, twat_logger.warning, twat_logger.error,
                   twat_logger.exception):
        method("value {}", Unprintable())


def test_exception_logs_the_traceback_of_the_exception_being_handled():
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(messages.append, level="DEBUG", format="{level} {name} {message}")
    set_debug_mode(True)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            twat_logger.exception("failed on {}", 7)
    finally:
        set_debug_mode(False)
        logger.remove(sink)
    [message] = messages
    assert message.startswith(f"ERROR {__name__} failed on 7")
    assert "ValueError: boom" in message


def test_import_does_not_load_loguru():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import twat_mp._logging"],
                         capture_output=True, text=True, timeout=60, env=QUIET_ENV)
    assert out.returncode == 0, out.stderr
    assert "twat_mp._logging" in out.stderr  # the import-time table was printed
    assert "loguru" not in out.stderr
    assert python("import sys, twat_mp\nprint('loguru' in sys.modules)").stdout.strip() == "False"


def test_set_debug_mode_loads_loguru_and_logs_to_stderr():
    out = python("""
        import sys
        from twat_mp import ProcessPool, set_debug_mode
        assert "loguru" not in sys.modules
        set_debug_mode(True)
        assert "loguru" in sys.modules
        with ProcessPool(nodes=1) as pool:
            pool.map(abs, [1])
        set_debug_mode(False)
        print("--- off ---", file=sys.stderr, flush=True)
        with ProcessPool(nodes=1) as pool:
            pool.map(abs, [1])
    """)
    before, after = out.stderr.split("--- off ---")
    assert "twat_mp.pools" in before and "starting ProcessPool with 1 workers" in before
    assert after.strip() == ""


def test_env_variable_turns_on_debug_logs():
    code = "from twat_mp import ProcessPool\nwith ProcessPool(nodes=1) as p: p.map(abs, [1])"
    assert "starting ProcessPool" in python(code, env={**QUIET_ENV, "TWAT_MP_DEBUG": "1"}).stderr
    assert python(code).stderr == ""


def test_debug_output_goes_to_the_stderr_of_the_moment_it_is_written():
    out = python("""
        import io, sys
        from twat_mp import set_debug_mode
        from twat_mp._logging import logger
        set_debug_mode(True)
        replaced = io.StringIO()
        sys.stderr = replaced
        logger.debug("written late {}", 42)
        sys.stderr = sys.__stderr__
        print(replaced.getvalue())
    """)
    assert "written late 42" in out.stdout
    assert "written late" not in out.stderr


def test_a_program_that_configured_loguru_keeps_its_handlers():
    out = python("""
        import sys
        from loguru import logger
        logger.remove()
        logger.add(sys.stdout, format="mine: {message}")
        from twat_mp import ProcessPool, set_debug_mode
        set_debug_mode(True)
        with ProcessPool(nodes=1) as pool:
            pool.map(abs, [1])
    """)
    assert "mine: starting ProcessPool" in out.stdout
    assert out.stderr == ""


@pytest.mark.timeout(120)
def test_debug_logs_at_exit_after_pytest_closed_its_capture(tmp_path):
    """Bug 5: loguru kept pytest's captured stderr, closed before exit hooks log ("I/O operation on closed file")."""
    (tmp_path / "test_left_on.py").write_text(textwrap.dedent("""
        import atexit
        from twat_mp import pmap, set_debug_mode
        from twat_mp._logging import logger

        def test_debug_mode_left_on():
            set_debug_mode(True)
            atexit.register(logger.debug, "logged at exit {}", 42)  # runs after pytest closed its capture
            assert pmap(abs)([-1, 2]) == [1, 2]  # a warm pool, stopped (and logging) at exit
    """))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_left_on.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=110, env=QUIET_ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
    assert "closed file" not in out.stderr and "Logging error" not in out.stderr, out.stderr
    assert "logged at exit 42" in out.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=QUIET_ENV)


@pytest.fixture(params=["script", "module"])
def cli(request: pytest.FixtureRequest) -> list[str]:
    """The installed ``twat-mp`` script and ``python -m twat_mp``."""
    if request.param == "script":
        assert TWAT_MP_BIN.exists(), f"{TWAT_MP_BIN} is missing: install the project (pip install -e .)"
        return [str(TWAT_MP_BIN)]
    return [sys.executable, "-m", "twat_mp"]


def test_cli_version_flag_and_command(cli):
    for args in (["--version"], ["version"]):
        out = run_cli(*cli, *args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == twat_mp.__version__


def test_cli_without_a_command_prints_the_help(cli):
    out = run_cli(*cli)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: twat-mp")
    for word in ("--version", "version", "demo"):
        assert word in out.stdout


def test_cli_rejects_an_unknown_command(cli):
    out = run_cli(*cli, "bogus")
    assert out.returncode == 2
    assert "invalid choice: 'bogus'" in out.stderr


def test_cli_main_in_process(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == twat_mp.__version__
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("usage: twat-mp")


def test_main_banner_prints_the_2x_banner():
    assert python("from twat_mp.cli import main_banner\nmain_banner()").stdout == f"twat-mp v{twat_mp.__version__}\n"
    if not hasattr(twat_mp, "main"):
        pytest.skip("twat_mp.main is not exported yet")
    assert twat_mp.main is main_banner
    assert python("import twat_mp\ntwat_mp.main()").stdout == f"twat-mp v{twat_mp.__version__}\n"


def test_cli_demo_runs_every_decorator_and_pool():
    out = subprocess.run([sys.executable, "-m", "twat_mp", "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for label in ["@pmap", "@imap", "@amap", "@apmap", "ProcessPool", "ThreadPool", "AsyncMultiPool", "x serial",
                  "@op graph", "pipelined calls", "round trip"]:
        assert label in out.stdout
