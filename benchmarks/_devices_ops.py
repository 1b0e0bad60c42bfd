"""The worker functions of benchmarks/devices.py, in an importable module.

twat-mp's forkserver workers import this module by name instead of re-running the
benchmark script (forkserver never imports ``__main__``); devices.py puts benchmarks/ on
their path. torch is imported inside the functions that need it, so a worker that only
sums numpy arrays never loads it.
"""

from __future__ import annotations

import collections
from typing import Any

IN_FEATURES = OUT_FEATURES = 256
BATCH_ROWS = 64
SEED = 0


def held_sum(a: Any) -> Any:
    """``np.sum`` that also keeps ``a`` alive in the worker (a reference row): the next
    call finds the shared segment still mapped here, so its pages fault in only once."""
    _hold(a)
    return a.sum()


def held_part_sum(big: Any, i: int, parts: int = 8) -> float:
    """``part_sum`` that keeps ``big`` alive in the worker (see ``held_sum``)."""
    _hold(big)
    return part_sum(big, i, parts)


def _hold(x: Any) -> None:
    from twat_mp import worker_state

    held = worker_state().setdefault("held", collections.deque(maxlen=32))
    held.append(x)


def part_sum(big: Any, i: int, parts: int = 8) -> float:
    """One map item of the tensor case: the sum of every ``parts``-th element from ``i``."""
    return float(big[i::parts].sum())


def build_model(seed: int = SEED) -> Any:
    """``torch.nn.Linear(256, 256)`` with weights from ``seed``: the same in every process."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
    model.eval()
    return model


def load_model(seed: int = SEED) -> None:
    """Pool initializer: build the model once per worker and keep it in its state."""
    import torch

    from twat_mp import worker_state

    worker_state()["model"] = build_model(seed)
    worker_state()["batch"] = torch.randn(BATCH_ROWS, IN_FEATURES, generator=torch.Generator().manual_seed(seed))


def forward(batch: Any) -> Any:
    """One map item of the batches case: the worker's model applied to one batch."""
    import torch

    from twat_mp import worker_state

    with torch.no_grad():
        return worker_state()["model"](batch)


def forward_numpy(batch: Any) -> Any:
    """``forward`` on a numpy batch, returning numpy (a reference row: the same bytes
    travel, without torch's tensor pickling on either side)."""
    import torch

    return forward(torch.from_numpy(batch)).numpy()


def forward_into(inputs: Any, outputs: Any, i: int) -> None:
    """``outputs[i] = model(inputs[i])`` on tensors in shared memory (a reference row:
    only references travel, the results are written in place)."""
    outputs[i] = forward(inputs[i])


def forward_local(_: int) -> None:
    """Compute alone (a reference row): the model on a batch the worker already holds."""
    import torch

    from twat_mp import worker_state

    with torch.no_grad():
        worker_state()["model"](worker_state()["batch"])


def drop(_: Any) -> None:
    """Transfer alone (a reference row): the batch is received and nothing is sent back."""


def threads(_: object = None) -> tuple[str, int]:
    """This worker's device tag and torch's intra-op threads (for the report)."""
    import os

    import torch

    return os.environ.get("TWAT_MP_DEVICE", "-"), torch.get_num_threads()

