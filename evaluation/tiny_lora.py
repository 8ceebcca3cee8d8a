"""Deterministic random LoRAs for a (tiny) SD1.x UNet, to test the LoRA path with no download.

:func:`make_tiny_lora` writes a LoRA for every UNet attention projection (``to_q``, ``to_k``,
``to_v``, ``to_out.0`` of ``attn1`` and ``attn2``) in one of the two layouts real LoRAs come in:

* ``"diffusers"``: the peft/diffusers layout ``StableDiffusionPipeline.save_lora_weights`` writes
  (``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` /
  ``.lora_B.weight``). Without ``alpha`` the LoRA scale is 1 (peft's ``lora_alpha = r``); with
  ``alpha`` the file carries diffusers' ``lora_adapter_metadata`` (``r``, ``lora_alpha``), so the
  scale is ``alpha / rank``.
* ``"kohya"``: the kohya-ss / A1111 layout
  (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``); the scale is ``alpha / rank`` (``alpha`` defaults to ``rank``).

Both load with ``pipe.load_lora_weights(file, adapter_name=...)``. Unlike peft's default init
(``lora_B = 0``, no effect at all), ``lora_B`` here is random and non-zero, so the LoRA visibly
changes the image. Same arguments -> byte-identical file. :func:`read_tiny_lora` reads either layout
back as ``{unet module name: (A, B, scale)}`` so tests can merge a LoRA into the weights by hand.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

#: The UNet weights this module targets (diffusers module names, ``.weight`` suffix).
_TARGET = re.compile(r"^(?P<module>.+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.weight$")
_KOHYA_PREFIX = "lora_unet_"


def _target_shapes(model_path_or_pipe: Any) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of the UNet's attention projections.

    Accepts a pipeline (anything with ``.unet``), a :class:`workers.diffusion.pipeline.LoadedModel` (``.pipe``)
    or a diffusers model folder (read from the safetensors header, no model is built).
    """
    source = getattr(model_path_or_pipe, "pipe", model_path_or_pipe)
    shapes: dict[str, tuple[int, int]] = {}
    if hasattr(source, "unet"):
        for name, tensor in source.unet.state_dict().items():
            # A pipeline that already holds LoRAs has peft's ``base_layer`` wrappers: see through them.
            name = name.replace(".base_layer.", ".")
            match = _TARGET.match(name)
            if match and tensor.ndim == 2:
                shapes[match["module"]] = (int(tensor.shape[0]), int(tensor.shape[1]))
    else:
        from safetensors import safe_open

        files = sorted((Path(source) / "unet").glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{source}/unet has no .safetensors weights to size a LoRA for")
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    match = _TARGET.match(name)
                    if match:
                        shape = handle.get_slice(name).get_shape()
                        if len(shape) == 2:
                            shapes[match["module"]] = (int(shape[0]), int(shape[1]))
    if not shapes:
        raise ValueError(f"{model_path_or_pipe!r} has no UNet attention projections (to_q/to_k/to_v/to_out.0)")
    return dict(sorted(shapes.items()))


def kohya_name(module: str) -> str:
    """``down_blocks.1.attentions.0...attn1.to_out.0`` -> ``lora_unet_down_blocks_1_..._attn1_to_out_0``."""
    return _KOHYA_PREFIX + module.replace(".", "_")


def make_tiny_lora(
    model_path_or_pipe: Any,
    out_file: Path,
    *,
    seed: int,
    rank: int = 4,
    layout: Literal["diffusers", "kohya"] = "diffusers",
    scale: float = 1.0,
    alpha: float | None = None,
) -> Path:
    """Write a random LoRA for the model's UNet attention projections to ``out_file``; return it.

    ``scale`` multiplies the random ``lora_B`` (the size of the LoRA's effect; at 1.0 ``B @ A`` is
    about as large as the tiny model's own weights). ``alpha`` sets the LoRA's alpha (scale
    ``alpha / rank`` at load time; ``None``: scale 1). The file is written atomically.
    """
    import torch
    from safetensors.torch import save_file

    if layout not in ("diffusers", "kohya"):
        raise ValueError(f"layout={layout!r}: use 'diffusers' or 'kohya'")
    if rank < 1:
        raise ValueError(f"rank={rank}: must be at least 1")
    shapes = _target_shapes(model_path_or_pipe)
    generator = torch.Generator("cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    for module, (out_features, in_features) in shapes.items():
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator) * (scale / rank**0.5)
        if layout == "diffusers":
            tensors[f"unet.{module}.lora_A.weight"] = down.contiguous()
            tensors[f"unet.{module}.lora_B.weight"] = up.contiguous()
        else:
            name = kohya_name(module)
            tensors[f"{name}.lora_down.weight"] = down.contiguous()
            tensors[f"{name}.lora_up.weight"] = up.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    if layout == "diffusers" and alpha is not None:
        # What save_lora_weights(..., unet_lora_adapter_metadata=...) writes: LoraConfig kwargs.
        config = {"r": rank, "lora_alpha": float(alpha), "target_modules": sorted(shapes)}
        metadata["lora_adapter_metadata"] = json.dumps(
            {f"unet.{k}": v for k, v in config.items()}, indent=2, sort_keys=True
        )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_file


def read_tiny_lora(file: Path, model_path_or_pipe: Any = None) -> dict[str, tuple[Any, Any, float]]:
    """Read a LoRA written by :func:`make_tiny_lora` as ``{unet module: (A, B, scale)}``.

    The LoRA's change to a module's weight at adapter weight ``w`` is ``w * scale * B @ A``. A
    kohya file names modules with ``_`` for ``.``, which is ambiguous: pass the model so they can be
    mapped back (without it the kohya names are the keys).
    """
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata() or {}
    out: dict[str, tuple[Any, Any, float]] = {}
    if all(k.startswith(_KOHYA_PREFIX) for k in tensors):
        names = {}
        if model_path_or_pipe is not None:
            names = {kohya_name(m): m for m in _target_shapes(model_path_or_pipe)}
        for key, down in tensors.items():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key[: -len(".lora_down.weight")]
            rank = down.shape[0]
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
            out[names.get(name, name)] = (down, tensors[f"{name}.lora_up.weight"], alpha / rank)
        return out
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("unet.") : -len(".lora_A.weight")]
        rank = down.shape[0]
        alpha = float(config.get("unet.lora_alpha", rank))
        out[module] = (down, tensors[f"unet.{module}.lora_B.weight"], alpha / rank)
    return out
