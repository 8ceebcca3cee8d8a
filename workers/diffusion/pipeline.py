"""Find, vet and load a Stable Diffusion v1.x pipeline for a worker.

A model location (from ``Settings.models``) is one of:

* ``builtin:tiny``: the tiny random pipeline, built on first use into ``<models_dir>/tiny``;
* a local diffusers folder (``model_index.json`` + ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``);
* a Hugging Face hub id (``owner/name``), downloaded into ``<models_dir>/hub`` (safetensors and
  configs of the five components only);
* a single ``.safetensors`` checkpoint (LDM/A1111 layout), converted once offline into
  ``<models_dir>/single-file/<sha256>/`` (:mod:`workers.diffusion.single_file`); its model hash is
  A1111's AutoV2 (first 10 hex digits of the file's sha256);
* any of these with ``;vae=<file or folder>``: that VAE replaces the model's.

The farm loads ``.safetensors`` weights only and never unpickles anything: a pickle file can run
arbitrary code when loaded, and a render farm loads models named in its configuration on many
machines. :func:`check_model_folder` refuses a folder before any weights file is opened.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from farm.errors import ModelLoadError
from farm.catalogue import BUILTINS, ModelLocation, locate
from workers.diffusion.tiny import make_tiny

#: Components whose weights are checked before loading.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
#: Components that hold only configs/vocabularies but must be there.
CONFIG_COMPONENTS = ("tokenizer", "scheduler")
#: File suffixes of pickle-based weights, which the farm refuses to load.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

#: What a hub download fetches: configs, the tokenizer and the full-precision safetensors of the
#: weight components (not the fp16/ema variants, safety checker or single-file checkpoints that
#: SD repositories also carry, which would multiply the download).
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    *(f"{c}/*.json" for c in WEIGHT_COMPONENTS + CONFIG_COMPONENTS),
    "tokenizer/*.txt",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model-*.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model-*.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/model-*.safetensors",
]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")

_CONVERT_HINT = (
    "re-save it with safe_serialization=True on a machine you trust, e.g. "
    "python -c \"from diffusers import StableDiffusionPipeline as P; "
    "P.from_pretrained('SRC').save_pretrained('DST', safe_serialization=True)\""
)


@dataclass
class LoadedModel:
    """A pipeline ready to render, with what the worker records next to each image."""

    name: str
    #: Local folder the pipeline was loaded from.
    path: Path
    #: A1111-style short model hash: first 10 hex chars of sha256 of the unet's safetensors weights.
    hash: str
    pipe: StableDiffusionPipeline
    device: str
    dtype: torch.dtype
    #: The model's ORIGINAL scheduler config: every scheduler swap starts from it (see
    #: ``workers.diffusion.schedulers.make_scheduler``), so options of one swap never leak into the next.
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    #: What ``workers.diffusion.speed.optimize`` applied (channels_last, fuse_qkv, vae_slicing, compile…).
    speed: dict[str, Any] = field(default_factory=dict)
    #: The worker's text-encoder output cache (``workers.diffusion.prompts.PromptCache``), if any.
    prompt_cache: Any = None
    #: The worker's textual-inversion embeddings (``workers.diffusion.embeddings.EmbeddingStore``), if any.
    embeddings: Any = None

    def __post_init__(self) -> None:
        if not self.scheduler_config:
            self.scheduler_config = dict(self.pipe.scheduler.config)


def check_model_folder(path: Path) -> None:
    """Raise :class:`ModelLoadError` saying why ``path`` is not a loadable safetensors SD folder.

    Looks only at file names: nothing is opened, so a pickle is refused before it could be loaded.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a folder")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path} has no model_index.json, so it is not a diffusers pipeline folder "
            "(a single .safetensors checkpoint is configured as the file itself)"
        )
    for component in WEIGHT_COMPONENTS + CONFIG_COMPONENTS:
        if not (path / component).is_dir():
            raise ModelLoadError(f"{path} has no {component}/ folder; a SD1.x pipeline needs one")
    for component in WEIGHT_COMPONENTS:
        files = [f for f in (path / component).iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            continue
        pickles = sorted(f.name for f in files if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{path / component} has pickle weights only ({', '.join(pickles)}) and no "
                ".safetensors: farm loads safetensors only and never unpickles; convert them: "
                + _CONVERT_HINT
            )
        raise ModelLoadError(
            f"{path / component} has no weights (no .safetensors file); a hub download fetches "
            "safetensors only, so a repository with .bin weights only must be converted first"
        )


def _unet_weight_files(path: Path) -> list[Path]:
    """The unet weights file(s) from_pretrained loads: the plain file, else its shards, else any."""
    unet = path / "unet"
    plain = unet / "diffusion_pytorch_model.safetensors"
    if plain.is_file():
        return [plain]
    shards = sorted(unet.glob("diffusion_pytorch_model-*.safetensors"))
    return shards or sorted(unet.glob("*.safetensors"))


@lru_cache(maxsize=64)
def _sha256_short(files: tuple[Path, ...], stamp: tuple[tuple[int, int], ...]) -> str:
    """sha256 over ``files`` in order, first 10 hex chars; ``stamp`` (size, mtime) keys the cache."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:10]


def model_hash(path: Path) -> str:
    """A1111-style short hash of the model at ``path`` (its unet weights), cached per file version."""
    files = tuple(f.resolve() for f in _unet_weight_files(Path(path)))
    if not files:
        raise ModelLoadError(f"{path}/unet has no .safetensors weights to hash")
    stamp = tuple((st.st_size, st.st_mtime_ns) for st in (f.stat() for f in files))
    return _sha256_short(files, stamp)


def _download(name: str, location: str, models_dir: Path) -> Path:
    """Fetch hub repo ``location`` (configs + safetensors only) into ``models_dir / 'hub'``."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            location, allow_patterns=HUB_ALLOW_PATTERNS, cache_dir=models_dir / "hub"
        )
    except Exception as exc:  # offline, unknown repo, gated, invalid id: all mean "cannot load"
        raise ModelLoadError(
            f"model {name!r}: {location!r} is neither a local folder nor reachable as a Hugging Face "
            f"hub repository ({type(exc).__name__}: {exc})"
        ) from exc
    return Path(folder)


def resolve_location(name: str, location: str, models_dir: Path) -> Path:
    """Turn model ``name``'s configured ``location`` into a local folder, building or fetching it.

    ``builtin:tiny`` is built once into ``models_dir / 'tiny'``; an existing folder is used as is;
    a hub id is downloaded. Single-file checkpoints and anything else raise :class:`ModelLoadError`.
    """
    found = locate(name, location, Path(models_dir))  # the catalogue classifies; this builds or fetches
    location = found.hub_id or found.configured
    if found.unknown_options:
        raise ModelLoadError(
            f"model {name!r}: unknown location option(s) {', '.join(found.unknown_options)} "
            "(known: ;vae=FILE_OR_FOLDER, ;config=DIFFUSERS_FOLDER)"
        )
    if found.kind == "single_file":
        from workers.diffusion.single_file import converted_folder

        return converted_folder(name, found.path, Path(models_dir), config=found.config)
    if found.kind == "built":
        return make_tiny(found.path)
    if found.kind == "shipped":
        if not found.path.is_dir():
            raise ModelLoadError(f"model {name!r}: the shipped model is missing at {found.path}")
        return found.path
    if found.kind == "folder":
        return found.path
    if found.kind == "hub":
        if not _HUB_ID.fullmatch(location):
            raise ModelLoadError(f"model {name!r}: {location!r} is neither an existing local folder nor a hub id (owner/name)")
        return _download(name, location, Path(models_dir))
    if found.path is None:
        raise ModelLoadError(f"model {name!r}: unknown built-in model {location!r} (known: {', '.join(BUILTINS)})")
    suffix = found.path.suffix.lower()
    if suffix == ".safetensors":
        raise ModelLoadError(f"model {name!r}: {found.path} (a single-file checkpoint) does not exist")
    if suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"model {name!r}: {location} is a pickle checkpoint: farm loads safetensors only and never "
            "unpickles; convert it to a diffusers folder with safetensors weights on a machine you trust"
        )
    if found.path.exists():
        raise ModelLoadError(f"model {name!r}: {location} is a file, not a diffusers pipeline folder")
    raise ModelLoadError(f"model {name!r}: {location!r} is neither an existing local folder nor a hub id (owner/name)")


def _use_sdpa(pipe: StableDiffusionPipeline) -> None:
    """Make every classic attention processor PyTorch's fused SDPA one (diffusers' default)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in (pipe.unet, pipe.vae):
        processors = module.attn_processors
        if any(type(p) is AttnProcessor for p in processors.values()):
            module.set_attn_processor(
                {k: AttnProcessor2_0() if type(p) is AttnProcessor else p for k, p in processors.items()}
            )


def load_pipeline(
    name: str, location: str, *, models_dir: Path, device: str, speed: Mapping[str, Any] | None = None
) -> LoadedModel:
    """Resolve, vet and load model ``name`` onto ``device`` (fp16 on CUDA, fp32 elsewhere).

    ``speed``: keyword arguments for :func:`workers.diffusion.speed.optimize` (channels_last, fuse_qkv,
    vae_slicing, compile, compile_mode); a knob left out takes the device's default (all on for
    CUDA except compile, all off on CPU).

    Raises :class:`ModelLoadError` with the reason when anything fails; no pickle is ever loaded.
    """
    path = resolve_location(name, location, models_dir)
    check_model_folder(path)
    found: ModelLocation = locate(name, location, Path(models_dir))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
    except Exception as exc:
        raise ModelLoadError(f"model {name!r}: cannot load {path}: {type(exc).__name__}: {exc}") from exc
    if found.vae is not None:
        from workers.diffusion.single_file import load_vae

        pipe.register_modules(vae=load_vae(name, found.vae, Path(models_dir), reference_config=path / "vae", dtype=dtype))
    try:
        pipe.to(device)
    except Exception as exc:
        raise ModelLoadError(f"model {name!r}: cannot move it to {device!r}: {type(exc).__name__}: {exc}") from exc
    _use_sdpa(pipe)  # a no-op with diffusers' defaults; guards against a pipeline that reset them
    pipe.set_progress_bar_config(disable=True)
    from workers.diffusion.speed import optimize

    try:
        options = optimize(pipe, device=device, **dict(speed or {}))
    except Exception as exc:
        raise ModelLoadError(f"model {name!r}: cannot apply speed options {dict(speed or {})}: {type(exc).__name__}: {exc}") from exc
    # A single file's hash is A1111's (AutoV2 of the file), so images match what A1111/Civitai show.
    if found.kind == "single_file":
        from workers.diffusion.single_file import known_sha256

        short_hash = known_sha256(found.path, Path(models_dir))[:10]
    else:
        short_hash = model_hash(path)
    return LoadedModel(
        name=name, path=path, hash=short_hash, pipe=pipe, device=device, dtype=dtype, speed=options.as_dict()
    )
