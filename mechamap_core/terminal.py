"""Progress on the command line: a tqdm bar on stderr that takes the core's progress(done, total, message) calls."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, unit: str, position: int | None = None) -> Iterator[Callable[[int, int | None, str], None]]:
    """A tqdm bar on stderr, yielded as a progress(done, total, message) callback (total None: not known). The first
    call's done is where the bar starts (a resumed scan's documents), left out of its rate. position: the bar's line
    (a torchrun rank's, so that ranks' bars do not overwrite each other on one terminal)."""
    from tqdm import tqdm

    with tqdm(desc=description, unit=unit, file=sys.stderr, position=position) as bar:
        started = False

        def progress(done: int, total: int | None, message: str) -> None:
            nonlocal started
            if total is not None:
                bar.total = total
            bar.set_postfix_str(message, refresh=False)
            if not started:
                started = True
                bar.initial = bar.n = bar.last_print_n = done
                bar.refresh()
                return
            bar.update(done - bar.n)

        yield progress
