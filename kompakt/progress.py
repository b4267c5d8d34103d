"""Progress bars for long work (quantizing hundreds of layers, calibrating block by block).

Bars go to stderr and appear only on a terminal, so logs and CI output stay clean.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Iterates ``items`` with a bar labelled ``desc`` when ``enabled`` and stderr is a tty."""
    if not enabled:
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, disable=None, leave=False, unit="layer")
