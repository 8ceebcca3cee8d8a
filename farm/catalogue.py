"""The model catalogue: the one place that says where a configured model lives and how it renders
by default. The request path, the LoRA registry, the CLI and the worker all ask it.

A model location (``FARM_MODELS``: ``name=location``) is one of:

* ``builtin:shapes``: the small trained shapes model shipped with farm (the default model);
* ``builtin:tiny``: a tiny random SD-architecture pipeline, built by a worker on first use into
  ``<data_dir>/models/tiny``;
* a local diffusers folder (``model_index.json`` + ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``);
* a Hugging Face hub id (``owner/name``), which a worker downloads (safetensors only).

A model's render defaults come from a ``farm.json`` beside its weights (the shipped shapes model has
one: 64×64, 20 steps, CFG 5): a request's own value wins, then the model's ``farm.json``, then the
settings (``FARM_DEFAULT_STEPS``, ``FARM_DEFAULT_GUIDANCE_SCALE``, ``FARM_DEFAULT_SCHEDULER``,
``FARM_DEFAULT_SIZE``). Light: reading a model's defaults opens one small JSON file, never weights.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from farm.errors import ValidationError
from farm.settings import BUILTIN_SHAPES, BUILTIN_TINY, Settings, shipped_model

__all__ = ["BUILTINS", "Catalogue", "ModelDefaults", "ModelLocation"]

#: Built-in model locations and what they are.
BUILTINS = {
    BUILTIN_SHAPES: "the small trained shapes model shipped with farm",
    BUILTIN_TINY: "a tiny random SD-architecture pipeline, built on first use",
}


@dataclass(frozen=True)
class ModelDefaults:
    """How a model renders when a request does not say: every field resolved."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str


@dataclass(frozen=True)
class ModelLocation:
    """Where a configured model lives. ``kind`` is ``shipped``, ``built`` (made on first use at
    ``path``), ``folder``, ``hub`` (``hub_id``) or ``missing`` (a path that is not there)."""

    name: str
    configured: str
    kind: str
    path: Path | None = None
    hub_id: str | None = None


@functools.lru_cache(maxsize=64)
def _farm_json(path: str) -> dict:
    try:
        data = json.loads((Path(path) / "farm.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


#: ``farm.json`` keys → ModelDefaults fields.
_FARM_JSON_KEYS = {
    "width": "width",
    "height": "height",
    "steps": "default_steps",
    "guidance_scale": "default_guidance_scale",
    "scheduler": "scheduler",
}


def _looks_like_path(location: str) -> bool:
    return location.startswith(("/", "./", "../", "~", ".\\")) or "\\" in location or location.count("/") > 1


def locate(name: str, configured: str, models_dir: Path) -> ModelLocation:
    """Classify a configured location (the one place that does): see the module docstring."""
    configured = configured.strip()
    if configured == BUILTIN_SHAPES:
        return ModelLocation(name, configured, "shipped", shipped_model("shapes"))
    if configured == BUILTIN_TINY:
        return ModelLocation(name, configured, "built", Path(models_dir) / "tiny")
    if configured.startswith("builtin:"):
        return ModelLocation(name, configured, "missing")
    path = Path(configured).expanduser()
    if path.is_dir():
        return ModelLocation(name, configured, "folder", path)
    if path.exists() or _looks_like_path(configured) or path.suffix.lower() in _FILE_SUFFIXES:
        return ModelLocation(name, configured, "missing", path)
    return ModelLocation(name, configured, "hub", hub_id=configured)


#: Suffixes that make a location a file, never a hub id (checkpoints the worker explains it refuses).
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class Catalogue:
    """The configured models (``settings.models``): names, locations and render defaults."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._defaults: dict[str, ModelDefaults] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.settings.models)

    @property
    def default(self) -> str:
        return self.settings.default_model  # type: ignore[return-value]  # set by Settings' validator

    def check_name(self, model: object, *, index: int | None = None, field: str = "model") -> str:
        """``model`` (None: the default model) as a configured name, or a ValidationError naming the choices."""
        model = self.default if model is None else model
        if not isinstance(model, str) or model not in self.settings.models:
            raise ValidationError(field, model, f"unknown model; valid names: {', '.join(self.names)}", index=index)
        return model

    def location(self, model: str) -> ModelLocation:
        """Where ``model`` lives, as configured (nothing is built or downloaded here)."""
        return locate(model, self.settings.models[model], self.settings.models_dir)

    def folder(self, model: str) -> Path | None:
        """The model's local folder when it is readable here now (None for hub ids and unbuilt models)."""
        path = self.location(model).path
        return path if path is not None and path.is_dir() else None

    def defaults(self, model: str) -> ModelDefaults:
        """The model's render defaults: its ``farm.json``, then the settings (read once per catalogue:
        a 100k-row campaign asks for every row)."""
        if model not in self._defaults:
            self._defaults[model] = self._read_defaults(model)
        return self._defaults[model]

    def _read_defaults(self, model: str) -> ModelDefaults:
        settings = self.settings
        base = {
            "width": settings.default_size,
            "height": settings.default_size,
            "steps": settings.default_steps,
            "guidance_scale": settings.default_guidance_scale,
            "scheduler": settings.default_scheduler,
        }
        folder = self.folder(model)
        shipped = _farm_json(str(folder)) if folder is not None else {}
        for ours, theirs in _FARM_JSON_KEYS.items():
            if theirs in shipped:
                base[ours] = shipped[theirs]
        return ModelDefaults(**base)
