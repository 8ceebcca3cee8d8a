"""Why images fail, in a few classes an operator can act on.

A failed image's ``error`` is ``"<ErrorType>: <message>"`` (the worker writes it so), or the claim's
own "gave up after N attempts" line. Metrics, ``farm status`` and campaign status group failures by
:func:`reason_class` — one storage outage is one line with a count, not one line per object key.
"""

from __future__ import annotations

__all__ = ["REASON_CLASSES", "lines", "reason_class", "summarize"]

#: class → (what it means, what to do); the order is the order of the checks.
REASON_CLASSES = {
    "input": "an init image or mask could not be read or decoded: fix the input and retry-failed",
    "lora": "a LoRA could not be loaded or does not fit the model",
    "out_of_memory": "out of GPU memory even at one image: a smaller size, or a bigger GPU",
    "worker_lost": "the worker rendering it vanished too often (killed, crashed, out of host memory)",
    "storage": "storage refused the image past the upload deadline",
    "model": "the worker's model could not be loaded",
    "render": "the render itself raised (see the example's message)",
    "other": "anything else",
}

_BY_TYPE = {
    "InputError": "input",
    "ImageDecodeError": "input",
    "LoraError": "lora",
    "OutOfMemoryError": "out_of_memory",
    "StorageError": "storage",
    "StorageUnavailable": "storage",
    "MissingObject": "storage",
    "ModelLoadError": "model",
    "RenderError": "render",
    "RuntimeError": "render",
    "ValueError": "render",
}


def reason_class(error: str | None) -> str:
    """The class of a failed image's ``error`` text (one of :data:`REASON_CLASSES`)."""
    if not error:
        return "other"
    if error.startswith("gave up after"):
        return "worker_lost"
    head = error.split(":", 1)[0].strip()
    if head.startswith("CUDA error"):
        return "render"
    if "out of memory" in error.lower() and head in ("RuntimeError", "OutOfMemoryError", "RenderError"):
        return "out_of_memory"
    return _BY_TYPE.get(head.rsplit(".", 1)[-1], "other")


def summarize(session, *where) -> dict[str, tuple[int, str]]:
    """Failed images matching ``where`` grouped by reason class: ``{class: (count, an example error)}``,
    commonest first — what ``farm status``, campaign status and ``farm top`` show."""
    from sqlalchemy import func, select

    from farm.db.tables import ImageRecord, Status

    grouped: dict[str, list] = {}
    rows = session.execute(
        select(ImageRecord.error, func.count())
        .where(ImageRecord.status == Status.failed.value, *where)
        .group_by(ImageRecord.error)
        .order_by(func.count().desc())
    )
    for error, count in rows:
        entry = grouped.setdefault(reason_class(error), [0, error or ""])
        entry[0] += count
    return {name: (count, example) for name, (count, example) in sorted(grouped.items(), key=lambda kv: -kv[1][0])}


def lines(summary: dict[str, tuple[int, str]], indent: str = "  ") -> list[str]:
    """One line per reason class: ``failed ×12 storage: StorageUnavailable: … (e.g.)``."""
    return [f"{indent}failed ×{count} {name}: {example.splitlines()[0][:160] if example else ''}" for name, (count, example) in summary.items()]
