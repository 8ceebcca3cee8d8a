"""The model catalogue: the one place that says where a configured model lives and how it renders
by default. The request path, the LoRA registry, the CLI and the worker all ask it.

A model location (``FARM_MODELS``: ``name=location``) is one of:

* ``builtin:shapes``: the small trained shapes model shipped with farm (the default model);
* ``builtin:tiny``: a tiny random SD-architecture pipeline, built by a worker on first use into
  ``<data_dir>/models/tiny``;
* a local diffusers folder (``model_index.json`` + ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``);
* a Hugging Face hub id (``owner/name``), which a worker downloads (safetensors only);
* a single ``.safetensors`` checkpoint (the A1111/CompVis "LDM" layout, e.g. ``v1-5-pruned-emaonly
  .safetensors`` or ``sd-v1-5-inpainting.safetensors``), converted once by a worker into a cached
  diffusers folder. Options follow the path after ``;``: ``vae=<file or folder>`` (a VAE that replaces
  the model's, e.g. ``vae-ft-mse-840000-ema-pruned.safetensors``) and ``config=<diffusers folder>``
  (the architecture, for models that are not SD1.x-sized; SD1.x's own configs ship in
  ``farm/data/sd1``). ``FARM_MODELS='sd15=/m/v1-5.safetensors;vae=/m/vae-ft-mse.safetensors'``.
  A ``vae=`` option works after a diffusers folder too. ``.ckpt`` files are refused: farm never
  unpickles.

Single files are recognised from their safetensors header alone (:func:`inspect_checkpoint`: a few
kB read, no tensor loaded): layout (LDM or diffusers keys), variant (9-channel inpainting from the
UNet's ``conv_in`` weight shape), dtype, EMA weights. Their A1111 model hash (AutoV2) is the first 10
hex digits of the file's sha256 (:func:`autov2_hash`).

A model's render defaults come from a ``farm.json`` beside its weights (the shipped shapes model has
one: 64×64, 20 steps, CFG 5): a request's own value wins, then the model's ``farm.json``, then the
settings (``FARM_DEFAULT_STEPS``, ``FARM_DEFAULT_GUIDANCE_SCALE``, ``FARM_DEFAULT_SCHEDULER``,
``FARM_DEFAULT_SIZE``). Light: reading a model's defaults opens one small JSON file, never weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from farm.errors import ValidationError
from farm.settings import BUILTIN_SHAPES, BUILTIN_TINY, Settings, shipped_model

__all__ = [
    "BUILTINS",
    "Catalogue",
    "CheckpointInfo",
    "ModelDefaults",
    "ModelLocation",
    "autov2_hash",
    "file_sha256",
    "inspect_checkpoint",
    "read_safetensors_header",
]

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
    ``path``), ``folder``, ``single_file`` (a ``.safetensors`` checkpoint at ``path``), ``hub``
    (``hub_id``) or ``missing`` (a path that is not there). ``vae`` and ``config`` are the location's
    ``;vae=`` and ``;config=`` options (see the module docstring)."""

    name: str
    configured: str
    kind: str
    path: Path | None = None
    hub_id: str | None = None
    vae: Path | None = None
    config: Path | None = None
    #: Options of the location that are not understood (a worker refuses them with the reason).
    unknown_options: tuple[str, ...] = field(default=())


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


#: Options a location may carry after ``;`` (``path;vae=…;config=…``).
LOCATION_OPTIONS = ("vae", "config")


def split_location(configured: str) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """``"a.safetensors;vae=/v.safetensors"`` → ``("a.safetensors", {"vae": "/v.safetensors"}, unknown)``."""
    base, *items = (part.strip() for part in configured.strip().split(";"))
    options: dict[str, str] = {}
    unknown: list[str] = []
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if sep and key.strip() in LOCATION_OPTIONS and value.strip():
            options[key.strip()] = value.strip()
        else:
            unknown.append(item)
    return base, options, tuple(unknown)


def locate(name: str, configured: str, models_dir: Path) -> ModelLocation:
    """Classify a configured location (the one place that does): see the module docstring."""
    configured = configured.strip()
    base, options, unknown = split_location(configured)
    extra = {
        "vae": Path(options["vae"]).expanduser() if "vae" in options else None,
        "config": Path(options["config"]).expanduser() if "config" in options else None,
        "unknown_options": unknown,
    }
    if base == BUILTIN_SHAPES:
        return ModelLocation(name, configured, "shipped", shipped_model("shapes"), **extra)
    if base == BUILTIN_TINY:
        return ModelLocation(name, configured, "built", Path(models_dir) / "tiny", **extra)
    if base.startswith("builtin:"):
        return ModelLocation(name, configured, "missing", **extra)
    path = Path(base).expanduser()
    if path.is_dir():
        return ModelLocation(name, configured, "folder", path, **extra)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return ModelLocation(name, configured, "single_file", path, **extra)
    if path.exists() or _looks_like_path(base) or path.suffix.lower() in _FILE_SUFFIXES:
        return ModelLocation(name, configured, "missing", path, **extra)
    return ModelLocation(name, configured, "hub", hub_id=base, **extra)


#: Suffixes that make a location a file, never a hub id (checkpoints the worker explains it refuses).
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


# --- single-file checkpoints: read from the safetensors header only (light: no torch) -------------

#: The most header bytes read (real SD checkpoints have ~100-200 kB of header).
MAX_HEADER_BYTES = 64 << 20

#: Key prefixes of the LDM (CompVis / A1111) checkpoint layout.
LDM_UNET, LDM_VAE, LDM_TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors (name → ``{"dtype", "shape", "data_offsets"}``) listed in a safetensors header.

    ``ValueError`` when the file is not a safetensors file (e.g. a pickle renamed .safetensors).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single ``.safetensors`` file holds, read from its header.

    ``layout``: ``ldm`` (a whole SD1.x checkpoint: ``model.diffusion_model.``, ``first_stage_model.``,
    ``cond_stage_model.transformer.``), ``ldm-vae`` (a VAE alone, A1111's ``encoder.down.0…``),
    ``diffusers-unet`` / ``diffusers-vae`` (one diffusers component), ``sd2``, ``sdxl`` or ``unknown``.
    ``in_channels``: of the UNet's conv_in (9: inpainting). ``dtype``: of the UNet (or VAE) weights
    (``F16``, ``F32``, ``BF16``). ``ema``: ``model_ema.*`` weights are in the file too (the loader uses
    the main weights, as A1111 does; an "emaonly" file's main weights are the EMA ones).
    """

    layout: str
    in_channels: int | None
    dtype: str | None
    ema: bool
    tensors: int
    #: UNet width (conv_in out channels) and cross-attention width (768 for SD1.x).
    unet_width: int | None = None
    context_dim: int | None = None

    @property
    def variant(self) -> str:
        """``inpainting`` (9-channel UNet), ``txt2img`` (4) or ``unknown``."""
        return {9: "inpainting", 4: "txt2img"}.get(self.in_channels or 0, "unknown")

    @property
    def is_sd1_sized(self) -> bool:
        return self.unet_width in (None, 320) and self.context_dim in (None, 768)


def _most_common_dtype(header: dict[str, dict], prefix: str) -> str | None:
    counts: dict[str, int] = {}
    for key, value in header.items():
        if key.startswith(prefix) and isinstance(value, dict):
            counts[value.get("dtype", "?")] = counts.get(value.get("dtype", "?"), 0) + 1
    return max(counts, key=counts.get) if counts else None  # type: ignore[arg-type]


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Classify a single safetensors file from its header (see :class:`CheckpointInfo`)."""
    header = read_safetensors_header(path)
    keys = header.keys()

    def shape(key: str) -> list[int] | None:
        entry = header.get(key)
        return list(entry["shape"]) if isinstance(entry, dict) and "shape" in entry else None

    ema = any(k.startswith("model_ema.") for k in keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        layout, prefix, conv_in, context = "sdxl", "model.diffusion_model.", "model.diffusion_model.input_blocks.0.0.weight", None
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        layout, prefix, conv_in, context = "sd2", "model.diffusion_model.", "model.diffusion_model.input_blocks.0.0.weight", None
    elif any(k.startswith(LDM_UNET) for k in keys):
        layout, prefix, conv_in = "ldm", LDM_UNET, LDM_UNET + "input_blocks.0.0.weight"
        context = LDM_UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if context not in header:  # an architecture whose first block has no attention
            context = next((k for k in keys if k.startswith(LDM_UNET) and k.endswith("attn2.to_k.weight")), None)
    elif "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys) and any(k.startswith("time_embedding.") for k in keys):
        layout, prefix, conv_in = "diffusers-unet", "", "conv_in.weight"
        context = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    elif "encoder.conv_in.weight" in keys and any(k.startswith("encoder.down_blocks.") for k in keys):
        layout, prefix, conv_in, context = "diffusers-vae", "", "encoder.conv_in.weight", None
    elif "encoder.conv_in.weight" in keys and any(k.startswith("encoder.down.") for k in keys):
        layout, prefix, conv_in, context = "ldm-vae", "", "encoder.conv_in.weight", None
    else:
        layout, prefix, conv_in, context = "unknown", "", "", None
    conv = shape(conv_in) if conv_in else None
    unet = layout in ("ldm", "diffusers-unet", "sd2", "sdxl")
    ctx = shape(context) if context else None
    return CheckpointInfo(
        layout=layout,
        in_channels=conv[1] if conv and unet and len(conv) == 4 else None,
        dtype=_most_common_dtype(header, prefix) if layout != "unknown" else None,
        ema=ema,
        tensors=len(header),
        unet_width=conv[0] if conv and unet else None,
        context_dim=ctx[1] if ctx and len(ctx) == 2 else None,
    )


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), cached per (path, size, mtime) for the life of the process."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


def autov2_hash(path: Path) -> str:
    """A1111's model hash (AutoV2; Civitai's too): the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]


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
