"""Waiting on work with an optional progress bar: one loop for submissions and campaigns."""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from farm.db.tables import FINISHED
from farm.errors import WaitTimeout

S = TypeVar("S")

#: Statuses an image ends in (succeeded, failed, canceled, filtered: ``farm.db.tables.FINISHED``).
_FINISHED = tuple(sorted(status.value for status in FINISHED))


class Tally:
    """What a submission's or campaign's status counts (``counts`` by state) and the totals read
    from it; :func:`wait_until` shows it."""

    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts.get(state, 0) for state in _FINISHED)


def wait_until(
    read: Callable[[], S],
    done: Callable[[S], bool],
    *,
    timeout: float | None,
    poll_interval: float,
    progress: bool,
    desc: str,
    timed_out: Callable[[S], str],
) -> S:
    """Poll ``read()`` until ``done(status)``; the status needs ``total``, ``finished``, ``counts``,
    ``steps_done`` and ``steps_total``: the bar advances by denoising steps (images × steps), so it
    moves while a batch renders, not only when its images finish.

    Raises :class:`~farm.errors.WaitTimeout` with ``timed_out(status)`` when ``timeout`` passes first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    bar: Any = None
    try:
        while True:
            status = read()
            if progress:
                if bar is None:
                    from tqdm import tqdm

                    bar = tqdm(total=status.steps_total, desc=desc, unit="step")
                bar.total = status.steps_total
                bar.n = status.steps_done
                shown = {"images": f"{status.finished}/{status.total}"}
                shown.update({k: v for k, v in status.counts.items() if v and k not in ("succeeded", "queued", "running")})
                bar.set_postfix(shown, refresh=False)
                bar.refresh()
            if done(status):
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(timed_out(status))
            time.sleep(poll_interval)
    finally:
        if bar is not None:
            bar.close()
