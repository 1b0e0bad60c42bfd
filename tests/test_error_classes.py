"""Exception classes defined in a script's ``__main__`` or a notebook cell are caught by
``except MyError`` when raised in a worker process (bug 7 of issue 7): the worker can
only send such a class by value, and the caller re-creates the error as its own class
of the same name. Each case runs a real script (or kernel) in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    from twat_mp import ProcessPool, WorkerError, pmap

    class MyError(Exception):
        """Extra attributes and an __init__ whose arguments are not its args."""

        def __init__(self, code, *, detail="none"):
            super().__init__(f"code {code}")
            self.code = code
            self.detail = detail

    class Plain(ValueError):
        pass

    def fail(x):
        if x == 2:
            raise MyError(x, detail="two")
        if x == 5:
            raise Plain("five")
        return x

    def check(how, call):
        try:
            call()
        except MyError as exc:  # the class of this script, not a copy of it
            return {"how": how, "both": isinstance(exc, WorkerError), "code": exc.code, "detail": exc.detail,
                    "args": list(exc.args), "original": type(exc.original_exception) is MyError,
                    "item": exc.input_item, "text": str(exc), "remote": "raise MyError" in exc.traceback_str}
        except Exception as exc:
            return {"how": how, "missed": repr(exc), "type": repr(type(exc)), "mro": repr(type(exc).__mro__)}
        return {"how": how, "missed": "nothing raised"}

    def as_worker_error(call):
        try:
            call()
        except WorkerError as exc:
            return isinstance(exc, Plain) and isinstance(exc, ValueError) and str(exc.original_exception) == "five"
        return False

    if __name__ == "__main__":
        method = sys.argv[1]
        found = []
        with ProcessPool(nodes=2, start_method=method) as pool:
            found.append(check("map", lambda: pool.map(fail, range(4))))
            found.append(check("submit", lambda: pool.submit(fail, 2).result(timeout=60)))
            found.append(check("imap", lambda: list(pool.imap(fail, range(4)))))
            plain = as_worker_error(lambda: pool.map(fail, [5]))

        @pmap(nodes=2, start_method=method)
        def pfail(x):
            return fail(x)

        found.append(check("pmap", lambda: pfail(range(4))))
        print(json.dumps({"found": found, "plain": plain}))
''')


def run_script(tmp_path, *args: str) -> dict:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, "-W", "ignore", str(script), *args], capture_output=True, text=True,
                         timeout=150, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_script_exception_class_is_caught_by_its_own_name(tmp_path, start_method):
    result = run_script(tmp_path, start_method)
    assert result["plain"] is True
    for found in result["found"]:
        assert "missed" not in found, found
        assert found["both"] and found["original"] and found["remote"], found
        assert (found["code"], found["detail"], found["args"]) == (2, "two", ["code 2"]), found
        assert "code 2" in found["text"] and "code code" not in found["text"], found
