"""Functions defined in a ``__main__`` script, run as a real subprocess, and the console
script."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

import twat_mp

SCRIPT = textwrap.dedent("""
    from twat_mp import ProcessPool, imap, pmap

    def triple(x):
        return 3 * x

    @pmap
    def square(x):
        return x * x

    def outer(n):  # defined in __main__, calls a decorated function inside a worker
        return sum(square(range(n)))

    def main():
        base = 5
        with ProcessPool(nodes=2) as pool:
            print(pool.map(triple, range(4)))
            print(pool.map(lambda x: x + base, range(3)))
            print(pool.map(lambda x: triple(x) + base, [1]))
        print(square(range(4)))
        print(list(imap(triple)(range(3))))
        print(pmap(outer)([3, 4]))

    if __name__ == "__main__":
        main()
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", [None, "spawn"])
def test_functions_from_a_main_script(tmp_path, start_method):
    script = tmp_path / "main_script.py"
    source = SCRIPT
    if start_method:
        source = source.replace("ProcessPool(nodes=2)", f"ProcessPool(nodes=2, start_method={start_method!r})")
    script.write_text(source)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:6] == ["[0, 3, 6, 9]", "[5, 6, 7]", "[8]", "[0, 1, 4, 9]", "[0, 3, 6]", "[5, 14]"]


@pytest.mark.timeout(60)
def test_module_and_console_script_print_the_version():
    module = subprocess.run([sys.executable, "-m", "twat_mp", "version"], capture_output=True, text=True, timeout=50)
    assert module.stdout.strip() == twat_mp.__version__
    console = pathlib.Path(sys.executable).with_name("twat-mp")
    script = subprocess.run([str(console), "version"], capture_output=True, text=True, timeout=50)
    assert script.stdout.strip() == twat_mp.__version__
