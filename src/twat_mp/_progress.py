"""Progress bars: tqdm.auto, so a widget in Jupyter and text in a terminal."""

from __future__ import annotations

from typing import Any


def progress_bar(progress: bool | str | None, source: Any, total: int | None = None) -> Any:
    """A tqdm bar for ``progress`` (``True`` or a label), or None when it is off."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(source)
        except TypeError:
            total = None
    label = progress if isinstance(progress, str) else None
    return tqdm(total=total, desc=label, unit="item")
