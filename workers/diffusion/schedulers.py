"""Turn a farm scheduler name (``farm.request.schedulers.SCHEDULERS``) into a diffusers scheduler.

Always build from the model's ORIGINAL scheduler config (``LoadedModel.scheduler_config``), never
from ``pipe.scheduler.config`` after a swap: ``from_config`` carries over every key it knows, so
chaining swaps would let one scheduler's options (e.g. ``use_karras_sigmas``) leak into the next.
A swap costs 2-3 ms, so doing it per batch is fine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import diffusers
from diffusers import SchedulerMixin

from farm.errors import RenderError
from farm.request.schedulers import SCHEDULERS


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """Return a new scheduler ``name`` built from ``base_config`` plus the table's options.

    Raises :class:`RenderError` for a name not in ``SCHEDULERS`` (listing the valid ones) or when
    diffusers cannot build it (e.g. LMS without scipy).
    """
    info = SCHEDULERS.get(name)
    if info is None:
        raise RenderError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, info.diffusers_class, None)
    if cls is None:
        raise RenderError(
            f"scheduler {name!r} needs diffusers.{info.diffusers_class}, which this diffusers "
            f"{diffusers.__version__} does not have"
        )
    try:
        return cls.from_config(base_config, **info.options)
    except ImportError as exc:  # LMSDiscreteScheduler imports scipy lazily
        raise RenderError(f"scheduler {name!r} ({info.diffusers_class}) cannot be built: {exc}") from exc
