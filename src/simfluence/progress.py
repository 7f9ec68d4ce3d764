"""Progress bars: shown on a terminal only, never written into a log or a pipe."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """A ``tqdm`` bar over ``iterable`` (or with ``total=``), drawn only when ``enabled``.

    It is drawn only when standard error is a terminal, too (tqdm's ``disable=None``);
    elsewhere it prints nothing.
    """
    return tqdm(iterable, disable=None if enabled else True, **options)
