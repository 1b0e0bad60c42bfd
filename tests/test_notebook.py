"""Notebooks are a first-class use: a real Jupyter kernel (nbclient + ipykernel) runs
cells that define functions and map them in worker processes."""

from __future__ import annotations

import json
import sys

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

from conftest import wait_gone

CELLS = [
    "import json, os, sys\nfrom twat_mp import ProcessPool, pmap, apmap\nOFFSET = 10",
    "def cube(x):\n    return x ** 3\n\ndef shifted(x):\n    return x + OFFSET",
    "with ProcessPool(nodes=2) as pool:\n"
    "    cubes = pool.map(cube, range(6))\n"
    "    lambdas = pool.map(lambda x: x * 2, range(3))\n"
    "    factor = 3\n"
    "    def closure(x):\n"
    "        return x * factor\n"
    "    closures = pool.map(closure, [1, 2])\n"
    "    worker_pids = set(pool.map(lambda _: os.getpid(), range(20), chunksize=1))\n"
    "assert cubes == [0, 1, 8, 27, 64, 125]",
    "@pmap\ndef square(x):\n    return x * x\n\nsquares = square(range(5))\nshift_first = pmap(shifted)([1, 2])",
    "OFFSET = 100  # changed after the warm pool exists\nshift_later = pmap(shifted)([1, 2])",
    "print(json.dumps({'exe': sys.executable, 'cubes': cubes, 'lambdas': lambdas, 'closures': closures,"
    " 'squares': squares, 'shift_first': shift_first, 'shift_later': shift_later,"
    " 'kernel_pid': os.getpid(), 'worker_pids': sorted(worker_pids)}))",
]

ASYNC_CELLS = [
    "import asyncio, json\nfrom twat_mp import apmap",
    "@apmap\nasync def get(x):\n    await asyncio.sleep(0.01)\n    return x * 10",
    "result = await get(range(5))",  # top-level await: the kernel's loop is running
    "print(json.dumps(result))",
]


def run_notebook(cells: list[str]) -> list[dict]:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    client = NotebookClient(notebook, kernel_name="python3", timeout=120)
    client.execute()
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


def last_json(outputs: list[dict]):
    texts = [o["text"] for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout"]
    return json.loads(texts[-1].strip().splitlines()[-1])


@pytest.mark.timeout(240)
def test_functions_defined_in_cells_map_in_worker_processes():
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    result = last_json(run_notebook(CELLS))
    assert result["exe"] == sys.executable  # the kernel runs this very environment
    assert result["cubes"] == [0, 1, 8, 27, 64, 125]
    assert result["lambdas"] == [0, 2, 4]
    assert result["closures"] == [3, 6]
    assert result["squares"] == [0, 1, 4, 9, 16]
    assert result["shift_first"] == [11, 12]
    assert result["shift_later"] == [101, 102]  # the function is pickled anew each call
    assert result["kernel_pid"] not in result["worker_pids"]
    # the kernel is shut down and no worker outlives it
    leftover = {c.pid for c in psutil.Process().children(recursive=True)} - before
    assert wait_gone(leftover | set(result["worker_pids"]), within=10.0) == set()


@pytest.mark.timeout(240)
def test_apmap_with_top_level_await_in_a_notebook():
    assert last_json(run_notebook(ASYNC_CELLS)) == [0, 10, 20, 30, 40]
