"""AUTOMATIC1111's API vocabulary ↔ the farm's request: samplers, payload fields, infotexts.

Pure functions (no FastAPI, no database): :func:`to_request` turns an A1111 ``txt2img``/``img2img``
payload into a farm request dict for :class:`farm.request.intake.Intake` (through
``Farm.submit_many``), refusing what the farm does not do with a :class:`~farm.errors.ValidationError`
naming the field. Unknown fields are ignored, as A1111 does.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any, Mapping

from farm.errors import ValidationError
from farm.request.schedulers import SCHEDULERS
from farm.request.text import shown

__all__ = [
    "SCHEDULE_TYPES", "decode_image", "lora_tags", "parse_infotext", "sampler_list", "scheduler_list", "to_request",
    "to_scheduler",
]

_KARRAS = " Karras"
#: A1111 ≥ 1.9 "Schedule type" names (lower case, as its API takes them) the farm can honour:
#: the sampler's own schedule, or Karras sigmas where the farm has a Karras variant.
SCHEDULE_TYPES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}
_BASE_SCHEDULES = {"", "automatic", "uniform", "normal", "default", "ddim"}

#: A1111 sampler name (lower case) → farm scheduler; each farm name is its own alias too.
_SAMPLERS: dict[str, str] = {}
for _name, _info in SCHEDULERS.items():
    _SAMPLERS[_info.a1111_name.lower()] = _name
    _SAMPLERS[_name] = _name
    _SAMPLERS["k_" + _name] = _name
_SAMPLERS.update({"plms": "pndm", "euler_ancestral": "euler_a", "k_euler_a": "euler_a", "k_dpmpp_2m": "dpmpp_2m",
                  "k_dpmpp_2m_ka": "dpmpp_2m_karras", "dpm++ 2m karras": "dpmpp_2m_karras"})

#: Fields refused when set to anything but their "off" value: ``{field: (is_off(value), what to say)}``
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "enable_hr": (lambda v: not v, "hires fix is not supported; render at the final size (width/height)"),
    "alwayson_scripts": (lambda v: not v, "scripts and extensions (ControlNet, ADetailer, …) are not supported"),
    "script_name": (lambda v: not v, "scripts are not supported"),
    "styles": (lambda v: not v, "prompt styles are not supported; put the text in the prompt"),
    "restore_faces": (lambda v: not v, "face restoration is not supported"),
    "tiling": (lambda v: not v, "tiling is not supported"),
    "subseed_strength": (lambda v: not v, "variation seeds are not supported"),
    "seed_resize_from_h": (lambda v: v is None or (isinstance(v, (int, float)) and v <= 0), "seed resize is not supported"),
    "seed_resize_from_w": (lambda v: v is None or (isinstance(v, (int, float)) and v <= 0), "seed resize is not supported"),
    "refiner_checkpoint": (lambda v: not v, "refiner models are not supported"),
    "include_init_images": (lambda v: not v, "returning the init images is not supported"),
    "initial_noise_multiplier": (lambda v: v is None or v == 1, "only 1 is supported"),
}
_LORA_TAG = re.compile(r"<(lora|lyco|hypernet):([^:>]*)((?::[^:>]*)*)>", re.I)
_RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill"}


def to_scheduler(sampler: Any, schedule: Any = None, *, field: str = "sampler_name") -> str | None:
    """A1111 ``sampler_name`` (+ ``scheduler``, the A1111 ≥ 1.9 schedule type) → a farm scheduler name.

    ``None``/empty sampler: the model's default (None). Unknown names are a ValidationError naming the field.
    """
    if schedule is not None and not isinstance(schedule, str):
        raise ValidationError("scheduler", shown(schedule), "must be a string")
    schedule_key = (schedule or "").strip().lower()
    if sampler is None or sampler == "":
        if schedule_key == "karras":
            raise ValidationError("scheduler", schedule, "Karras needs a sampler_name that has a Karras variant (DPM++ 2M)")
        return None
    if not isinstance(sampler, str):
        raise ValidationError(field, shown(sampler), "must be a string")
    name = _SAMPLERS.get(sampler.strip().lower())
    if name is None:
        raise ValidationError(field, shown(sampler), f"unknown sampler; valid names: {', '.join(i.a1111_name for i in SCHEDULERS.values())}")
    if schedule_key in _BASE_SCHEDULES:
        return name
    if schedule_key == "karras":
        if SCHEDULERS[name].options.get("use_karras_sigmas"):
            return name
        karras = next((n for n, i in SCHEDULERS.items() if i.a1111_name == SCHEDULERS[name].a1111_name + _KARRAS), None)
        if karras is None:
            raise ValidationError("scheduler", schedule, f"{SCHEDULERS[name].a1111_name} has no Karras variant here; use automatic")
        return karras
    raise ValidationError("scheduler", shown(schedule), f"unknown or unsupported schedule type; valid: {', '.join(SCHEDULE_TYPES)}")


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``."""
    return [{"name": info.a1111_name, "aliases": [name, "k_" + name], "options": {}} for name, info in SCHEDULERS.items()]


def scheduler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``."""
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name, label in SCHEDULE_TYPES.items()
    ]


def decode_image(value: Any, field: str) -> bytes:
    """Base64 (optionally a ``data:image/…;base64,`` URL) → bytes; the farm checks the image itself."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, shown(value), "must be a base64-encoded PNG, JPEG or WebP")
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        raise ValidationError(field, shown(value[:40]), "is not valid base64") from None


def lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """``"a cat <lora:ink:0.8>"`` → ``("a cat", [{"name": "ink", "weight": 0.8}])``. A1111's extra
    networks syntax is not part of the farm's prompt syntax, so the tags become the request's LoRAs."""
    loras: dict[str, float] = {}

    def take(match: re.Match) -> str:
        kind, name, rest = match.group(1).lower(), match.group(2).strip(), match.group(3)
        if kind == "hypernet":
            raise ValidationError("prompt", match.group(0), "hypernetworks are not supported (LoRAs are: <lora:name:weight>)")
        if not name:
            raise ValidationError("prompt", match.group(0), "a <lora:…> tag needs a name")
        weights = [w for w in rest.split(":")[1:]]
        try:
            weight = float(weights[0]) if weights and weights[0].strip() else 1.0
        except ValueError:
            raise ValidationError("prompt", match.group(0), "the LoRA weight must be a number (<lora:name:0.8>)") from None
        loras[name] = loras.get(name, 0.0) + weight
        return ""

    cleaned = _LORA_TAG.sub(take, prompt)
    if loras:
        cleaned = re.sub(r"\s+,", ",", re.sub(r"[ \t]{2,}", " ", cleaned))
        cleaned = re.sub(r",\s*(,\s*)+", ", ", cleaned).strip().strip(",").strip()
    return cleaned, [{"name": name, "weight": weight} for name, weight in loras.items()]


def _int(payload: Mapping[str, Any], name: str, default: int, lo: int) -> int:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValidationError(name, shown(value), f"must be an integer, at least {lo}")
    return value


def model_of(title: Any, field: str = "sd_model_checkpoint") -> str:
    """An A1111 checkpoint title (``name``, ``name.safetensors [hash]``) → the farm model name."""
    if not isinstance(title, str) or not title.strip():
        raise ValidationError(field, shown(title), "must be a model name (GET /sdapi/v1/sd-models)")
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", title.strip())
    for suffix in (".safetensors", ".ckpt"):
        name = name.removesuffix(suffix)
    return name


def clip_skip_of(value: Any, field: str = "CLIP_stop_at_last_layers") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 1 <= value <= 2:
        raise ValidationError(field, shown(value), "must be 1 or 2")
    return int(value)


def to_request(payload: Mapping[str, Any], *, img2img: bool, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An A1111 ``txt2img``/``img2img`` payload → a farm request dict (for ``Farm.submit_many``).

    ``options`` are the caller's A1111 options (``POST /sdapi/v1/options``): ``sd_model_checkpoint``
    and ``CLIP_stop_at_last_layers`` are the defaults a payload's ``override_settings`` override.
    What the payload leaves out (steps, cfg_scale, width, height, sampler) is the model's own default.
    """
    if not isinstance(payload, Mapping):
        raise ValidationError("request", shown(payload), "must be a JSON object")
    for name, (is_off, why) in _UNSUPPORTED.items():
        if name in payload and not is_off(payload[name]):
            raise ValidationError(name, shown(payload[name]), why)
    options = dict(options or {})
    override = payload.get("override_settings") or {}
    if not isinstance(override, Mapping):
        raise ValidationError("override_settings", shown(override), "must be an object")
    settings = {**options, **override}

    prompt = payload.get("prompt") or ""
    negative = payload.get("negative_prompt") or ""
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if not isinstance(text, str):
            raise ValidationError(name, shown(text), "must be a string")
    loras: list[dict[str, Any]] = []
    if "<" in prompt:
        cleaned, loras = lora_tags(prompt)
        if payload.get("disable_extra_networks"):
            loras = []
        prompt = cleaned

    batch_size = _int(payload, "batch_size", 1, 1)
    n_iter = _int(payload, "n_iter", 1, 1)
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValidationError("seed", shown(seed), "must be an integer (-1: random)")
    sampler = payload.get("sampler_name") or payload.get("sampler_index")
    field = "sampler_name" if payload.get("sampler_name") else "sampler_index"
    request: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative,
        "num_images": batch_size * n_iter,
        "seed": None if seed is None or seed == -1 else seed,
        "steps": payload.get("steps"),
        "guidance_scale": payload.get("cfg_scale"),
        "width": payload.get("width"),
        "height": payload.get("height"),
        "scheduler": to_scheduler(sampler, payload.get("scheduler"), field=field),
    }
    if settings.get("sd_model_checkpoint"):
        request["model"] = model_of(settings["sd_model_checkpoint"])
    if settings.get("CLIP_stop_at_last_layers") is not None:
        request["clip_skip"] = clip_skip_of(settings["CLIP_stop_at_last_layers"])
    if loras:
        request["loras"] = loras

    if img2img:
        images = payload.get("init_images")
        if not isinstance(images, list) or not images:
            raise ValidationError("init_images", shown(images), "needs one base64 image")
        if len(images) > 1:
            raise ValidationError("init_images", f"{len(images)} images", "one init image per request")
        request["init_image"] = decode_image(images[0], "init_images[0]")
        strength = payload.get("denoising_strength")
        request["strength"] = 0.75 if strength is None else strength
        mode = payload.get("resize_mode", 0)
        if mode is None:
            mode = 0
        if isinstance(mode, bool) or mode not in _RESIZE_MODES:
            raise ValidationError("resize_mode", shown(mode), "must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill)")
        request["resize_mode"] = _RESIZE_MODES[mode]
        if payload.get("mask"):
            mask = decode_image(payload["mask"], "mask")
            if payload.get("inpainting_mask_invert"):
                mask = _inverted(mask)
            request["mask"] = mask
            blur = payload.get("mask_blur")
            request["mask_blur"] = 4 if blur is None else blur
    elif payload.get("init_images"):
        raise ValidationError("init_images", "given", "belongs to /sdapi/v1/img2img")
    return {k: v for k, v in request.items() if v is not None or k == "seed"}


def _inverted(data: bytes) -> bytes:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            ImageOps.invert(image.convert("L")).save(out, format="PNG")
            return out.getvalue()
    except Exception:  # noqa: BLE001 - a bad mask: the farm's own check names it
        return data


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext → ``{"Prompt", "Negative prompt", "Steps", …}`` (values as strings)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    pairs = re.findall(r'\s*([\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last)
    result: dict[str, Any] = {}
    if len(pairs) >= 3:
        lines = lines[:-1]
        for key, value in pairs:
            result[key.strip()] = value.strip()[1:-1] if value.strip().startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip(), **result}
