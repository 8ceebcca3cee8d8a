"""What the light side knows about configured models without loading them: their recommended
settings, from a ``farm.json`` beside the weights (the shipped shapes model has one)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from farm.settings import Settings, shipped_model


def folder(settings: Settings, model: str) -> Path | None:
    """The model's local folder when it is a built-in or a local path (None for hub ids)."""
    location = settings.models[model]
    if location.startswith("builtin:"):
        name = location.split(":", 1)[1]
        return shipped_model(name) if name != "tiny" else settings.models_dir / "tiny"
    path = Path(location).expanduser()
    return path if path.is_dir() else None


@functools.lru_cache(maxsize=64)
def _read(path: str) -> dict:
    try:
        data = json.loads((Path(path) / "farm.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recommended(settings: Settings, model: str) -> dict:
    """``{"width", "height", "steps", "guidance_scale"}`` the model recommends (only those it gives)."""
    path = folder(settings, model)
    if path is None:
        return {}
    shipped = _read(str(path))
    names = {"width": "width", "height": "height", "steps": "default_steps", "guidance_scale": "default_guidance_scale"}
    return {ours: shipped[theirs] for ours, theirs in names.items() if theirs in shipped}
