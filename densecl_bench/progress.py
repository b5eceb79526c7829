"""The one progress bar every long loop uses: tqdm with an ETA on a terminal, quiet in logs.

The rule, in one place: a bar is drawn only when stderr is a terminal (tqdm's `disable=None`) and
only by the first process of a torchrun job (RANK 0, read from the environment so that this module
imports no torch); `progress=True/False` forces it on or off (tests, callers that know better).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def quiet(progress: bool | None = None) -> bool | None:
    """tqdm's `disable` under the rule above: True off the first rank, else None (auto) unless forced."""
    if int(os.environ.get("RANK", "0")) != 0:
        return True
    return None if progress is None else not progress


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        progress: bool | None = None, **kwargs: Any) -> tqdm:
    """A progress bar (rate and ETA) over `iterable`, or one to `update()` by hand up to `total`."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet(progress), dynamic_ncols=True, **kwargs)
