"""Progress bars for the long jobs of the command line (train, val, predict, bench, tune,
inspect, maps): tqdm's, drawn only where the output is a terminal (quiet in logs and CI)."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             leave: bool = False) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar on stderr when stderr is a terminal (and tqdm is
    installed: the ``train`` extra), else as they are."""
    if not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items

    return tqdm(items, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True)
