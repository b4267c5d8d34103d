"""Progress for long work: bars (quantizing hundreds of layers) and one-line status messages
(capturing a model with torch.export can take minutes and has no finer steps to count).

Both go to stderr and appear only on a terminal, so logs and CI output stay clean.
"""

from __future__ import annotations

import sys
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


def status(message: str, enabled: bool = True) -> None:
    """Prints ``kompakt: <message>`` to stderr when ``enabled`` and stderr is a terminal."""
    if enabled and sys.stderr.isatty():
        print(f"kompakt: {message}", file=sys.stderr, flush=True)
