"""Single ``.safetensors`` SD1.x checkpoints: converted once into a cached diffusers folder.

A model location that is one ``.safetensors`` file in the LDM (CompVis / A1111) layout is converted
with diffusers' own ``from_single_file`` against a *local* config folder — never the hub:

* SD1.x-sized files use the configs shipped in ``farm/data/sd1/v1`` (txt2img) or
  ``farm/data/sd1/v1-inpainting`` (a 9-channel UNet, read from ``conv_in``'s weight shape), written
  from the published SD1.x architecture, with the real CLIP tokenizer built offline
  (:mod:`workers.diffusion.tokenizer`); :func:`config_folder` completes them once in the cache;
* other sizes need ``;config=<diffusers folder>`` (its JSON configs and tokenizer are read, its weights
  never).

The converted pipeline is written (safetensors only, atomically, under a lock) to
``<models_dir>/single-file/<sha256 of the file>[-<config digest>]/`` and every later load is a plain
``from_pretrained`` of that folder. A ``;vae=`` file (LDM ``encoder.down…`` or diffusers layout) is
converted the same way into ``<models_dir>/single-file/vae-<sha256>/``.

:func:`diffusers_to_ldm` is the opposite mapping (diffusers → LDM keys), re-implemented from the
logic of diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` but driven by the
model's own keys, so it also maps the tiny model (2 UNet blocks, 1-layer VAE blocks). The tests and
``workers.diffusion.tiny.export_ldm`` use it to make single-file fixtures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import farm
from farm.catalogue import LDM_TEXT, LDM_UNET, LDM_VAE, CheckpointInfo, file_sha256, inspect_checkpoint
from farm.errors import ModelLoadError

#: The shipped SD1.x config folders (no weights, no tokenizer files: see :func:`config_folder`).
SD1_CONFIGS = Path(farm.__file__).resolve().parent / "data" / "sd1"
#: Cache folder under ``models_dir``.
CACHE_DIR = "single-file"
#: Bump when the conversion changes in a way that changes the converted weights.
CONVERSION_VERSION = 1


# --- diffusers → LDM key mapping ------------------------------------------------------------------

_RESNET_TO_LDM = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str, table: list[tuple[str, str]]) -> str:
    head, _, tail = rest.partition(".")
    for ours, theirs in table:
        if head == ours:
            return f"{theirs}.{tail}"
    return rest


def unet_to_ldm(state: Mapping[str, object], layers_per_block: int) -> dict[str, object]:
    """A diffusers ``UNet2DConditionModel`` state dict in LDM keys (without the ``model.diffusion_model.`` prefix)."""
    stride = layers_per_block + 1  # LDM numbers input/output blocks consecutively: L layers + a resampler
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, object] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_FIXED:
            out[f"{_UNET_FIXED[module]}.{param}"] = value
            continue
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{stride * i + j + 1}.0.{_resnet(rest, _RESNET_TO_LDM)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{stride * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{stride * int(m[1]) + int(m[2])}.0.{_resnet(m[3], _RESNET_TO_LDM)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{stride * int(m[1]) + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            i = int(m[1])
            new = f"output_blocks.{stride * i + layers_per_block}.{2 if i in up_has_attention else 1}.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _RESNET_TO_LDM)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        else:
            raise ValueError(f"no LDM name for UNet key {key!r}")
        out[new] = value
    return out


_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: Mapping[str, object]) -> dict[str, object]:
    """A diffusers ``AutoencoderKL`` state dict in LDM keys (without the ``first_stage_model.`` prefix).

    The mid-block attention's linear weights become 1×1 convolutions, as LDM stores them.
    """
    ups = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(ups) + 1 if ups else 0
    vae_resnet = [("conv_shortcut", "nin_shortcut")]
    out: dict[str, object] = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], vae_resnet)}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], vae_resnet)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], vae_resnet)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            if m[2] not in _VAE_ATTENTION_TO_LDM:
                raise ValueError(f"no LDM name for VAE key {key!r}")
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm" and getattr(value, "ndim", 0) == 2:
                value = value.reshape(*value.shape, 1, 1)  # type: ignore[attr-defined]
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
            new = key
        else:
            raise ValueError(f"no LDM name for VAE key {key!r}")
        out[new] = value
    return out


def diffusers_to_ldm(unet: Mapping, vae: Mapping, text_encoder: Mapping, *, layers_per_block: int) -> dict:
    """One LDM-layout checkpoint (what A1111 loads) from the three components' state dicts."""
    out = {LDM_UNET + k: v for k, v in unet_to_ldm(unet, layers_per_block).items()}
    out.update({LDM_VAE + k: v for k, v in vae_to_ldm(vae).items()})
    # SD1.x checkpoints hold transformers-4 CLIPTextModel keys (``text_model.embeddings…``);
    # transformers 5's CLIPTextModel has no ``text_model`` level, so it is added back here.
    out.update(
        {LDM_TEXT + "text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.items() if not k.endswith("position_ids")}
    )
    return out


# --- config folders --------------------------------------------------------------------------------


def _digest_folder_configs(folder: Path) -> str:
    """A digest of a config folder's JSON/text files (so a cache entry names the config it used)."""
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in (".json", ".txt"):
            digest.update(str(file.relative_to(folder)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_folder(target: Path, write) -> Path:
    """Build ``target`` with ``write(tmp)`` in a sibling temp folder, then rename it into place (locked)."""
    if (target / ".complete").is_file():
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if (target / ".complete").is_file():
            return target
        if target.exists():
            shutil.rmtree(target)  # an interrupted build of ours (no .complete marker)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
        try:
            write(tmp)
            (tmp / ".complete").write_text("ok\n")
            tmp.chmod(0o755)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def config_folder(variant: str, cache_root: Path) -> Path:
    """The complete SD1.x config folder for ``variant`` (``txt2img`` or ``inpainting``): the shipped
    JSON configs plus the real CLIP tokenizer's files, written once under ``cache_root``."""
    source = SD1_CONFIGS / ("v1-inpainting" if variant == "inpainting" else "v1")
    target = Path(cache_root) / f"config-{source.name}-{_digest_folder_configs(source)}"

    def write(tmp: Path) -> None:
        from workers.diffusion.tokenizer import save_clip_tokenizer

        shutil.copytree(source, tmp, dirs_exist_ok=True)
        save_clip_tokenizer(tmp / "tokenizer")

    return _atomic_folder(target, write)


# --- conversion ------------------------------------------------------------------------------------


def known_sha256(path: Path, models_dir: Path) -> str:
    """The file's sha256, remembered on disk under ``<models_dir>/single-file/sha256/`` per (path, size,
    mtime, inode), so a restarted worker does not read a 2-4 GB checkpoint again (~6 s for 2 GB here)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}".encode()).hexdigest()
    record = Path(models_dir) / CACHE_DIR / "sha256" / key
    with contextlib.suppress(OSError):
        text = record.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", text):
            return text
    digest = file_sha256(path)
    with contextlib.suppress(OSError):
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{key}.{os.getpid()}")
        tmp.write_text(digest + "\n")
        os.replace(tmp, record)
    return digest


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Refuse every connection and name lookup made by THIS thread while converting (other threads,
    e.g. a broker heartbeat, are left alone), with the hub libraries in offline mode too."""
    import threading

    owner = threading.get_ident()
    saved = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)

    def guard(original):
        def refuse(*args, **kwargs):
            if threading.get_ident() != owner:
                return original(*args, **kwargs)
            raise ModelLoadError("a single-file conversion tried to reach the network; farm converts offline only")

        return refuse

    socket.socket.connect, socket.socket.connect_ex = guard(saved[0]), guard(saved[1])  # type: ignore[method-assign]
    socket.create_connection, socket.getaddrinfo = guard(saved[2]), guard(saved[3])  # type: ignore[assignment]
    old_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        import huggingface_hub.constants as hub_constants  # read at import: patch the constant too
    except ImportError:  # pragma: no cover
        hub_constants = None
    old_hub = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved  # type: ignore[method-assign]
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = old_hub
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_checkpoint(name: str, path: Path, info: CheckpointInfo, *, config: Path | None) -> None:
    """Refuse, with the reason, a single file that is not a whole SD1.x LDM checkpoint farm can convert."""
    where = f"model {name!r}: {path}"
    if info.layout == "sd2":
        raise ModelLoadError(f"{where} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); farm renders SD1.x only")
    if info.layout == "sdxl":
        raise ModelLoadError(f"{where} is an SDXL checkpoint; farm renders SD1.x only")
    if info.layout in ("diffusers-unet", "diffusers-vae", "ldm-vae"):
        raise ModelLoadError(
            f"{where} holds one component ({info.layout}), not a whole checkpoint: a diffusers-layout file "
            "belongs in a diffusers folder (unet/ or vae/); a VAE file is given as ';vae=FILE' after a model"
        )
    if info.layout != "ldm":
        raise ModelLoadError(f"{where} is not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)")
    if info.in_channels not in (4, 9):
        raise ModelLoadError(f"{where}: its UNet takes {info.in_channels} input channels; farm knows 4 (txt2img) and 9 (inpainting)")
    if config is None and not info.is_sd1_sized:
        raise ModelLoadError(
            f"{where}: its UNet (width {info.unet_width}, text width {info.context_dim}) is not SD1.x-sized "
            "(320, 768); give its architecture as ';config=<diffusers folder>'"
        )


def _convert(path: Path, sha256: str, config: Path, variant: str, target: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    # One pipeline class for both variants (the worker builds its img2img/inpaint pipelines from the
    # loaded components); the 9-channel UNet comes from the inpainting config.
    with no_network():
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            torch_dtype=torch.float32,  # the cache keeps full precision; the worker casts at load
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(target, safe_serialization=True)
    (target / "farm-source.json").write_text(
        json.dumps({"source": str(path), "sha256": sha256, "variant": variant, "config": str(config),
                    "conversion": CONVERSION_VERSION}, indent=2) + "\n"
    )


def converted_folder(name: str, path: Path, models_dir: Path, *, config: Path | None = None) -> Path:
    """The diffusers folder of single file ``path``, converting it on first use (cached by sha256)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"model {name!r}: {path} is not a .safetensors file; farm never unpickles")
    try:
        info = inspect_checkpoint(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from exc
    check_checkpoint(name, path, info, config=config)
    cache = Path(models_dir) / CACHE_DIR
    if config is not None:
        if not (Path(config) / "model_index.json").is_file():
            raise ModelLoadError(f"model {name!r}: config={config} is not a diffusers folder (no model_index.json)")
        config_dir, suffix = Path(config), "-" + _digest_folder_configs(Path(config))
    else:
        config_dir, suffix = config_folder(info.variant, cache), ""
    sha256 = known_sha256(path, models_dir)
    target = cache / f"{sha256}{suffix}"
    try:
        return _atomic_folder(target, lambda tmp: _convert(path, sha256, config_dir, info.variant, tmp))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model {name!r}: cannot convert {path}: {type(exc).__name__}: {exc}") from exc


def load_vae(name: str, vae: Path, models_dir: Path, *, reference_config: Path, dtype) -> object:
    """The ``AutoencoderKL`` of a ``;vae=`` option: a diffusers folder (``vae/`` inside a pipeline
    folder, or the VAE folder itself) or a single safetensors file in LDM or diffusers layout (converted
    once into ``<models_dir>/single-file/vae-<sha256>``). ``reference_config``: the model's ``vae/``
    config folder, whose architecture the file must fit."""
    from diffusers import AutoencoderKL

    vae = Path(vae)
    try:
        if vae.is_dir():
            folder = vae / "vae" if (vae / "vae" / "config.json").is_file() else vae
            return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
        if vae.suffix.lower() != ".safetensors" or not vae.is_file():
            raise ModelLoadError(f"model {name!r}: vae={vae} is neither a diffusers folder nor a .safetensors file")
        info = inspect_checkpoint(vae)
        if info.layout not in ("ldm-vae", "diffusers-vae", "ldm"):
            raise ModelLoadError(f"model {name!r}: vae={vae} holds no VAE weights ({info.layout} layout)")
        target = Path(models_dir) / CACHE_DIR / f"vae-{known_sha256(vae, models_dir)}-{_digest_folder_configs(reference_config)}"

        def write(tmp: Path) -> None:
            from safetensors.torch import load_file

            state = load_file(str(vae))
            if info.layout == "ldm":
                state = {k[len(LDM_VAE):]: v for k, v in state.items() if k.startswith(LDM_VAE)}
            model = AutoencoderKL.from_config(AutoencoderKL.load_config(reference_config))
            if info.layout != "diffusers-vae":
                from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

                state = convert_ldm_vae_checkpoint(state, dict(model.config))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ModelLoadError(
                    f"model {name!r}: vae={vae} does not fit the model's VAE "
                    f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[:3]})"
                )
            model.save_pretrained(tmp, safe_serialization=True)

        with no_network():
            folder = _atomic_folder(target, write)
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model {name!r}: cannot load vae={vae}: {type(exc).__name__}: {exc}") from exc
