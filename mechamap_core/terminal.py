"""Progress on the command line: a tqdm bar on stderr that takes the core's progress(done, total, message) calls."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, unit: str, position: int | None = None,
                 initial: int = 0) -> Iterator[Callable[[int, int | None, str], None]]:  # fmt: skip
    """A tqdm bar on stderr, yielded as a progress(done, total, message) callback (total None: not known). initial:
    where it starts (a resumed scan's documents), left out of its rate. position: its line (a torchrun rank's, so
    that ranks' bars do not overwrite each other on one terminal)."""
    from tqdm import tqdm

    with tqdm(desc=description, unit=unit, file=sys.stderr, position=position, initial=initial) as bar:

        def progress(done: int, total: int | None, message: str) -> None:
            if total is not None:
                bar.total = total
            bar.set_postfix_str(message, refresh=False)
            bar.update(done - bar.n)

        yield progress
