"""The generation request: one spec, checked at the boundary before anything is written or queued.

``GenerationRequest`` is what a user asks for; :func:`check_request` validates it against the
settings' :class:`~farm.settings.Limits` and expands it into one :class:`ImageSpec` per image, each
with its own seed (a missing seed is drawn once, here, and recorded).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from farm.errors import ValidationError
from farm.request.schedulers import SCHEDULER_NAMES
from farm.settings import Settings

__all__ = ["MAX_SEED", "CheckedRequest", "GenerationRequest", "ImageSpec", "PreparedInputs", "check_request"]

#: Seeds are 32-bit unsigned, as in A1111, so every seed the farm records can be typed back there.
MAX_SEED = 2**32 - 1


@dataclass
class GenerationRequest:
    """What a user asks for. ``None`` means "the farm's default" (see ``check_request``)."""

    prompt: str
    negative_prompt: str = ""
    num_images: int | None = None
    seed: int | None = None
    seeds: list[int] | None = None
    #: None: the model's own (its farm.json), else FARM_DEFAULT_STEPS / FARM_DEFAULT_GUIDANCE_SCALE
    steps: int | None = None
    guidance_scale: float | None = None
    #: None: the init image's size (rounded down to multiples of 8), else the model's own, else
    #: FARM_DEFAULT_SIZE
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    model: str | None = None
    #: img2img / inpainting: a path or bytes (the client uploads it once, by content hash)
    init_image: str | bytes | None = None
    #: inpainting: white = repaint, black = keep; same size as the init image
    mask: str | bytes | None = None
    #: how far from the init image: 0 keeps it, 1 ignores it (default 0.75 img2img, 1.0 inpainting)
    strength: float | None = None
    resize_mode: str = "resize"
    mask_blur: int = 0
    #: inpainting: paste the unmasked original pixels back, so they are kept exactly
    paste_back: bool = False
    #: 1 = the text encoder's last layer, 2 = the one before (as A1111's "Clip skip")
    clip_skip: int = 1
    #: registered LoRAs: [{"name": "ink", "weight": 0.8}, {"sha256": "…", "weight": 0.5}]
    loras: list[Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, index: int | None = None) -> "GenerationRequest":
        if not isinstance(data, Mapping):
            raise ValidationError("request", data, "must be an object of request fields", index=index)
        known = _REQUEST_FIELDS
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValidationError(
                unknown[0], data[unknown[0]], f"unknown field; valid fields: {', '.join(sorted(known))}", index=index
            )
        if "prompt" not in data:
            raise ValidationError("prompt", None, "is required", index=index)
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationRequest))


@dataclass(frozen=True)
class ImageSpec:
    """One image to render: every parameter resolved, the seed fixed."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    model: str
    request_index: int = 0
    mode: str = "txt2img"  # txt2img | img2img | inpaint
    init_image_key: str | None = None
    mask_key: str | None = None
    strength: float | None = None
    resize_mode: str = "resize"
    mask_blur: int = 0
    paste_back: bool = False
    clip_skip: int = 1
    #: ((sha256, weight), …), sorted: part of the batch key, so different sets never share a batch
    loras: tuple = ()

    @property
    def batch_key(self) -> tuple:
        """Images with equal keys can share one GPU batch (and one task); each keeps its own seed
        and its own init image and mask."""
        return (
            self.model, self.mode, self.width, self.height, self.steps, self.scheduler, self.guidance_scale,
            self.strength, self.resize_mode, self.mask_blur, self.paste_back, self.clip_skip, self.loras,
        )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ImageSpec":
        """The spec recorded in an image's ``params`` (extra recorded keys, like the parsed prompt, ignored)."""
        fields = {name: params[name] for name in _SPEC_FIELDS if name in params}
        fields["loras"] = tuple((str(sha), float(weight)) for sha, weight in fields.get("loras") or ())
        return cls(**fields)

    def recorded(self) -> dict[str, Any]:
        """What the image record keeps: the spec, plus the parsed form of prompts that use weighting syntax."""
        params = self.params()
        for name in ("prompt", "negative_prompt"):
            parsed = _parsed(params[name])
            if parsed is not None:
                params[f"{name}_parsed"] = parsed
        return params

    def params(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies and costs ~50 µs an image on a 100k campaign
        return {name: getattr(self, name) for name in _SPEC_FIELDS}


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ImageSpec))


@functools.lru_cache(maxsize=4096)  # a campaign repeats each prompt across its sweeps
def _parsed(text: str) -> list[dict[str, Any]] | None:
    from farm.request import prompt_syntax

    return prompt_syntax.describe(text) if text and prompt_syntax.has_syntax(text) else None


@dataclass
class CheckedRequest:
    request: GenerationRequest
    images: list[ImageSpec] = field(default_factory=list)


def _int(name: str, value: Any, lo: int, hi: int, index: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, value, f"must be an integer between {lo} and {hi}", index=index)
    if not lo <= value <= hi:
        raise ValidationError(name, value, f"must be between {lo} and {hi}", index=index)
    return value


def _text(name: str, value: Any, max_chars: int, index: int | None) -> str:
    if not isinstance(value, str):
        raise ValidationError(name, value, "must be a string", index=index)
    if len(value) > max_chars:
        raise ValidationError(
            name, value[:40] + "…", f"is {len(value)} characters; at most {max_chars} are allowed", index=index
        )
    if "\x00" in value:
        raise ValidationError(name, value[:40], "must not contain NUL characters", index=index)
    return value


def _size(name: str, value: Any, settings: Settings, index: int | None) -> int:
    lo, hi = settings.limits.min_size, settings.limits.max_size
    value = _int(name, value, lo, hi, index)
    if value % 8:
        raise ValidationError(
            name, value, f"must be a multiple of 8 (e.g. {value - value % 8} or {value - value % 8 + 8})", index=index
        )
    return value


@dataclass(frozen=True)
class PreparedInputs:
    """The request's input images, already checked by ``farm.imaging.inputs.prepare_image``."""

    init: Any = None  # PreparedImage
    mask: Any = None
    loras: tuple = ()  # ((sha256, weight), …) resolved from the registry


def check_request(
    request: GenerationRequest | Mapping[str, Any],
    settings: Settings,
    *,
    index: int | None = None,
    inputs: PreparedInputs | None = None,
    catalogue: Any = None,
) -> CheckedRequest:
    """Validate ``request`` against ``settings`` and expand it into one ImageSpec per image.

    ``inputs`` carries the request's checked init image and mask (the client reads and checks them
    first); a request naming an image without them is refused. ``catalogue`` (a
    :class:`~farm.catalogue.Catalogue` of ``settings``) gives the model's defaults; pass one to reuse
    it across many requests. Raises
    :class:`~farm.errors.ValidationError` naming the field, the value and the limit.
    """
    from farm.catalogue import Catalogue

    if not isinstance(request, GenerationRequest):
        request = GenerationRequest.from_dict(request, index=index)
    limits = settings.limits
    inputs = inputs or PreparedInputs()
    catalogue = catalogue or Catalogue(settings)
    model = catalogue.check_name(request.model, index=index)
    conditioning = _conditioning(request, inputs, index)
    request = _with_defaults(request, catalogue.defaults(model), inputs)

    prompt = _text("prompt", request.prompt, limits.max_prompt_chars, index)
    negative = _text("negative_prompt", request.negative_prompt or "", limits.max_prompt_chars, index)
    steps = _int("steps", request.steps, limits.min_steps, limits.max_steps, index)

    guidance = request.guidance_scale
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValidationError("guidance_scale", guidance, "must be a finite number", index=index)
    if not limits.min_guidance_scale <= guidance <= limits.max_guidance_scale:
        raise ValidationError(
            "guidance_scale",
            guidance,
            f"must be between {limits.min_guidance_scale} and {limits.max_guidance_scale}",
            index=index,
        )

    width = _size("width", request.width, settings, index)
    height = _size("height", request.height, settings, index)
    if width * height > limits.max_pixels:
        raise ValidationError(
            "width×height", f"{width}×{height}", f"must be at most {limits.max_pixels} pixels", index=index
        )

    scheduler = request.scheduler
    if not isinstance(scheduler, str) or scheduler not in SCHEDULER_NAMES:
        raise ValidationError(
            "scheduler", scheduler, f"unknown scheduler; valid names: {', '.join(SCHEDULER_NAMES)}", index=index
        )

    clip_skip = _int("clip_skip", request.clip_skip, 1, 2, index)
    if request.loras and not inputs.loras:
        raise ValidationError("loras", request.loras, "must be resolved against the registry (farm.request.Intake)", index=index)
    _check_prompt_syntax(prompt, "prompt", index)
    _check_prompt_syntax(negative, "negative_prompt", index)
    seeds = _seeds(request, limits.max_num_images, index)
    images = [
        ImageSpec(
            prompt=prompt,
            negative_prompt=negative,
            seed=seed,
            steps=steps,
            guidance_scale=float(guidance),
            width=width,
            height=height,
            scheduler=scheduler,
            model=model,
            request_index=index or 0,
            clip_skip=clip_skip,
            loras=inputs.loras,
            **conditioning,
        )
        for seed in seeds
    ]
    return CheckedRequest(request=request, images=images)


def _with_defaults(request: GenerationRequest, defaults: Any, inputs: PreparedInputs) -> GenerationRequest:
    """Fill what the request left unsaid: a request's value, then (for the size) the init image's,
    then the model's own (``farm.catalogue``: its farm.json, then the settings)."""
    width, height = defaults.width, defaults.height
    if inputs.init is not None:
        from farm.imaging.inputs import output_size

        width, height = output_size(inputs.init.width, inputs.init.height)
    return dataclasses.replace(
        request,
        width=width if request.width is None else request.width,
        height=height if request.height is None else request.height,
        steps=defaults.steps if request.steps is None else request.steps,
        guidance_scale=defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        scheduler=request.scheduler or defaults.scheduler,
    )


def _seeds(request: GenerationRequest, max_images: int, index: int | None) -> list[int]:
    """Per-image seeds: the explicit list, or ``seed, seed+1, …`` (drawn once here when missing)."""
    if request.seeds is not None:
        if not isinstance(request.seeds, (list, tuple)) or not request.seeds:
            raise ValidationError("seeds", request.seeds, "must be a non-empty list of integers", index=index)
        if request.seed is not None:
            raise ValidationError("seed", request.seed, "give either seed or seeds, not both", index=index)
        if request.num_images is not None and request.num_images != len(request.seeds):
            raise ValidationError(
                "num_images",
                request.num_images,
                f"must equal the number of seeds given ({len(request.seeds)})",
                index=index,
            )
        _int("num_images", len(request.seeds), 1, max_images, index)
        return [_int(f"seeds[{i}]", s, 0, MAX_SEED, index) for i, s in enumerate(request.seeds)]

    count = _int("num_images", 1 if request.num_images is None else request.num_images, 1, max_images, index)
    if request.seed is None:
        first = secrets.randbelow(MAX_SEED - count + 2)
    else:
        first = _int("seed", request.seed, 0, MAX_SEED, index)
        if first + count - 1 > MAX_SEED:
            raise ValidationError(
                "seed",
                first,
                f"with num_images={count} it can be at most {MAX_SEED - count + 1} "
                f"(the last image's seed would be {first + count - 1}; seeds go up to {MAX_SEED})",
                index=index,
            )
    return [first + i for i in range(count)]


def _check_prompt_syntax(text: str, field: str, index: int | None) -> None:
    from farm.request import prompt_syntax

    try:
        prompt_syntax.check(text)
    except ValidationError as exc:
        raise ValidationError(field, exc.value, exc.limit, index=index) from None


def _conditioning(request: GenerationRequest, inputs: PreparedInputs, index: int | None) -> dict[str, Any]:
    """Mode, input keys and image options of a request (txt2img when it names no image)."""
    from farm.imaging.inputs import RESIZE_MODES

    if request.init_image is None:
        if request.mask is not None:
            raise ValidationError("mask", "given", "needs an init_image to inpaint", index=index)
        for name, default in (("strength", None), ("mask_blur", 0), ("paste_back", False), ("resize_mode", "resize")):
            if getattr(request, name) != default:
                raise ValidationError(name, getattr(request, name), "only applies with an init_image", index=index)
        return {}
    if inputs.init is None:
        raise ValidationError(
            "init_image", "not uploaded", "submit it through Farm.submit/submit_many or `farm submit --init-image`", index=index
        )
    mode = "inpaint" if request.mask is not None else "img2img"
    strength = request.strength if request.strength is not None else (1.0 if mode == "inpaint" else 0.75)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValidationError("strength", strength, "must be a number between 0 and 1", index=index)
    if request.resize_mode not in RESIZE_MODES:
        raise ValidationError("resize_mode", request.resize_mode, f"must be one of {', '.join(RESIZE_MODES)}", index=index)
    mask_blur = _int("mask_blur", request.mask_blur, 0, 64, index)
    if not isinstance(request.paste_back, bool):
        raise ValidationError("paste_back", request.paste_back, "must be true or false", index=index)
    if mode == "inpaint":
        if inputs.mask is None:
            raise ValidationError("mask", "not uploaded", "submit it through Farm.submit/submit_many", index=index)
        if (inputs.mask.width, inputs.mask.height) != (inputs.init.width, inputs.init.height):
            raise ValidationError(
                "mask",
                f"{inputs.mask.width}x{inputs.mask.height}",
                f"must be the init image's size, {inputs.init.width}x{inputs.init.height}",
                index=index,
            )
    elif mask_blur or request.paste_back:
        raise ValidationError("mask_blur" if mask_blur else "paste_back", mask_blur or True, "only applies with a mask", index=index)
    return {
        "mode": mode,
        "init_image_key": inputs.init.key,
        "mask_key": inputs.mask.key if inputs.mask is not None else None,
        "strength": float(strength),
        "resize_mode": request.resize_mode,
        "mask_blur": mask_blur,
        "paste_back": request.paste_back,
    }
