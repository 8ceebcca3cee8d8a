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
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from farm.catalogue import Catalogue
from farm.errors import ValidationError
from farm.request.prompt_syntax import is_plain
from farm.request.schedulers import SCHEDULER_NAMES
from farm.request.text import Shown, shown, text_problem
from farm.settings import SAFETY_POLICIES, Settings

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
    #: the safety checker's policy for these images (off | flag | blur | drop); None: FARM_SAFETY
    safety: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, index: int | None = None) -> "GenerationRequest":
        if data.__class__ is not dict and not isinstance(data, Mapping):
            raise ValidationError("request", shown(data), "must be an object of request fields", index=index)
        known = _REQUEST_FIELDS
        if not known.issuperset(data):
            first = min((k for k in data if k not in known), key=repr)
            name = first if isinstance(first, str) and len(first) <= 60 and not text_problem(first, names=True) else repr(shown(first))
            raise ValidationError(
                name, shown(data[first]), f"unknown field; valid fields: {', '.join(sorted(known))}", index=index
            )
        if "prompt" not in data:
            raise ValidationError("prompt", None, "is required", index=index)
        # the dataclass's own __init__, without its cost (~3 µs a row on a 100k campaign): every
        # field has a plain default and every key was just checked to be a field
        request = cls.__new__(cls)
        request.__dict__.update(_REQUEST_DEFAULTS)
        request.__dict__.update(data)
        return request

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationRequest))
_REQUEST_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(GenerationRequest) if f.default is not dataclasses.MISSING
}
assert set(_REQUEST_DEFAULTS) == _REQUEST_FIELDS - {"prompt"}, "every optional field needs a plain default"


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
    #: textual-inversion embeddings the prompts use, ((name, sha256), …) sorted (``farm.embeddings``);
    #: recorded as ``[{"name", "sha256"}]``; workers expand exactly these names
    embeddings: tuple = ()
    #: what the safety checker does with the image (``farm.settings.SAFETY_POLICIES``); not part of
    #: the batch key: each image of a batch is checked on its own
    safety: str = "off"

    @property
    def batch_key(self) -> tuple:
        """Images with equal keys can share one GPU batch (and one task); each keeps its own seed
        and its own init image and mask."""
        return (
            self.model, self.mode, self.width, self.height, self.steps, self.scheduler, self.guidance_scale,
            self.strength, self.resize_mode, self.mask_blur, self.paste_back, self.clip_skip, self.loras,
            self.embeddings,
        )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ImageSpec":
        """The spec recorded in an image's ``params`` (extra recorded keys, like the parsed prompt, ignored)."""
        fields = {name: params[name] for name in _SPEC_FIELDS if name in params}
        fields["loras"] = tuple((str(sha), float(weight)) for sha, weight in fields.get("loras") or ())
        fields["embeddings"] = tuple(
            (str(e["name"]), str(e["sha256"])) if isinstance(e, Mapping) else (str(e[0]), str(e[1]))
            for e in fields.get("embeddings") or ()
        )
        return cls(**fields)

    def recorded(self) -> dict[str, Any]:
        """What the image record keeps: the spec, plus the parsed form of prompts that use weighting syntax."""
        params = self.params()
        params["embeddings"] = [{"name": name, "sha256": sha} for name, sha in self.embeddings]
        for name in ("prompt", "negative_prompt"):
            text = params[name]
            if text and not is_plain(text):  # most prompts: no syntax possible, no parse
                parsed = _parsed(text)
                if parsed is not None:
                    params[f"{name}_parsed"] = parsed
        return params

    def params(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies and costs ~50 µs an image on a 100k campaign; the
        # instance's own dict holds exactly the fields, in order (see _of), and is copied at C speed
        values = self.__dict__
        if len(values) == len(_SPEC_FIELDS):
            return values.copy()
        return {name: getattr(self, name) for name in _SPEC_FIELDS}

    @classmethod
    def _of(cls, values: dict[str, Any]) -> "ImageSpec":
        """The spec holding ``values`` (every field, in field order, already checked), built without the
        frozen dataclass's ``__init__`` (19 ``object.__setattr__`` calls: a third of a 100k campaign's
        checking time)."""
        spec = cls.__new__(cls)
        spec.__dict__.update(values)
        return spec


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ImageSpec))
#: Every field of ImageSpec in order, with its default (None for the required ones, always given).
_SPEC_DEFAULTS = {
    f.name: (None if f.default is dataclasses.MISSING else f.default) for f in dataclasses.fields(ImageSpec)
}


@functools.lru_cache(maxsize=4096)  # a campaign repeats each prompt across its sweeps
def _parsed(text: str) -> list[dict[str, Any]] | None:
    from farm.request import prompt_syntax

    return prompt_syntax.describe(text) if text and prompt_syntax.has_syntax(text) else None


class CheckedRequest:
    """A checked request: ``images`` (one ImageSpec per image) and ``request`` (what was asked, with
    every default filled in; built when first read: the submit path reads only ``images``)."""

    __slots__ = ("images", "_request", "_filled")

    def __init__(self, request: GenerationRequest, images: list[ImageSpec] | None = None, *, filled: dict | None = None):
        self._request = request
        self.images = [] if images is None else images
        self._filled = filled  # the defaults to fill into ``request`` when it is read

    @property
    def request(self) -> GenerationRequest:
        if self._filled is not None:
            filled = GenerationRequest.__new__(GenerationRequest)
            filled.__dict__.update(self._request.__dict__, **self._filled)
            self._request, self._filled = filled, None
        return self._request

    def __repr__(self) -> str:
        return f"CheckedRequest(request={self.request!r}, images={self.images!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckedRequest) and (self.request, self.images) == (other.request, other.images)


def _int(name: str, value: Any, lo: int, hi: int, index: int | None) -> int:
    if value.__class__ is not int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValidationError(name, shown(value), f"must be an integer between {lo} and {hi}", index=index)
    if not lo <= value <= hi:  # exact for any int: 10**400 compares, it is never converted
        raise ValidationError(name, shown(value), f"must be between {lo} and {hi}", index=index)
    return value


def _number(name: str, value: Any, lo: float, hi: float, index: int | None, *, message: str | None = None) -> float:
    """A finite int or float in [lo, hi] (an int is compared exactly: ``10**400`` is refused, not an
    OverflowError), returned as a float."""
    kind = value.__class__
    if kind is not float and kind is not int and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValidationError(name, shown(value), message or "must be a finite number", index=index)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(name, value, message or "must be a finite number", index=index)
    if not lo <= value <= hi:
        raise ValidationError(name, shown(value), message or f"must be between {lo} and {hi}", index=index)
    return float(value)


def _text(name: str, value: Any, max_chars: int, index: int | None) -> str:
    if value.__class__ is not str and not isinstance(value, str):
        raise ValidationError(name, shown(value), "must be a string", index=index)
    if len(value) > max_chars:
        raise ValidationError(
            name, value[:40] + "…", f"is {len(value)} characters; at most {max_chars} are allowed", index=index
        )
    problem = text_problem(value)
    if problem:
        raise ValidationError(name, shown(value) if "\x00" not in value else value[:40], problem, index=index)
    return value


def _size(name: str, value: Any, lo: int, hi: int, index: int | None) -> int:
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
    embeddings: tuple = ()  # ((name, sha256), …) of registered embeddings the prompts use


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
    if not isinstance(request, GenerationRequest):
        request = GenerationRequest.from_dict(request, index=index)
    limits = settings.limits
    inputs = inputs or _NO_INPUTS
    catalogue = catalogue or Catalogue(settings)
    model = catalogue.check_name(request.model, index=index)
    conditioning = _conditioning(request, inputs, index)

    # what the request leaves unsaid: its own value, then (for the size) the init image's, then the
    # model's own (``farm.catalogue``: its farm.json, then the settings)
    defaults = catalogue.defaults(model)
    if inputs.init is not None:
        from farm.imaging.inputs import output_size

        default_width, default_height = output_size(inputs.init.width, inputs.init.height)
    else:
        default_width, default_height = defaults.width, defaults.height
    width = default_width if request.width is None else request.width
    height = default_height if request.height is None else request.height
    steps = defaults.steps if request.steps is None else request.steps
    guidance = defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale
    scheduler = request.scheduler or defaults.scheduler

    prompt = _text("prompt", request.prompt, limits.max_prompt_chars, index)
    negative = _text("negative_prompt", request.negative_prompt or "", limits.max_prompt_chars, index)
    steps = _int("steps", steps, limits.min_steps, limits.max_steps, index)
    guidance = _number("guidance_scale", guidance, limits.min_guidance_scale, limits.max_guidance_scale, index)

    width = _size("width", width, limits.min_size, limits.max_size, index)
    height = _size("height", height, limits.min_size, limits.max_size, index)
    if width * height > limits.max_pixels:
        raise ValidationError(
            "width×height", f"{width}×{height}", f"must be at most {limits.max_pixels} pixels", index=index
        )

    if not isinstance(scheduler, str) or scheduler not in SCHEDULER_NAMES:
        raise ValidationError(
            "scheduler", shown(scheduler), f"unknown scheduler; valid names: {', '.join(SCHEDULER_NAMES)}", index=index
        )

    clip_skip = _int("clip_skip", request.clip_skip, 1, 2, index)
    safety = _safety(request.safety, settings, index)
    if request.loras and not inputs.loras:
        raise ValidationError("loras", shown(request.loras), "must be resolved against the registry (farm.request.Intake)", index=index)
    if not is_plain(prompt):
        _check_prompt_syntax(prompt, "prompt", index)
    if not is_plain(negative):
        _check_prompt_syntax(negative, "negative_prompt", index)
    seed = request.seed
    if (
        seed.__class__ is int and 0 <= seed <= MAX_SEED and request.seeds is None and request.num_images is None
    ):  # the usual row: one image, its seed given (what _seeds would return, without the detour)
        seeds = (seed,)
    else:
        seeds = _seeds(request, limits.max_num_images, index)
    c = conditioning or _TXT2IMG_VALUES
    # every ImageSpec field, in field order (ImageSpec.params relies on it)
    values = {
        "prompt": prompt, "negative_prompt": negative, "seed": seeds[0], "steps": steps, "guidance_scale": guidance,
        "width": width, "height": height, "scheduler": scheduler, "model": model, "request_index": index or 0,
        "mode": c["mode"], "init_image_key": c["init_image_key"], "mask_key": c["mask_key"], "strength": c["strength"],
        "resize_mode": c["resize_mode"], "mask_blur": c["mask_blur"], "paste_back": c["paste_back"],
        "clip_skip": clip_skip, "loras": inputs.loras, "embeddings": inputs.embeddings, "safety": safety,
    }
    images = [ImageSpec._of(values)]
    for seed in seeds[1:]:
        images.append(ImageSpec._of({**values, "seed": seed}))
    return CheckedRequest(
        request, images,
        filled={"width": width, "height": height, "steps": steps, "guidance_scale": guidance, "scheduler": scheduler},
    )


_NO_INPUTS = PreparedInputs()
#: A plain text-to-image request's conditioning: nothing (ImageSpec's defaults). Never mutated.
_TXT2IMG: dict[str, Any] = {}
_TXT2IMG_VALUES = {
    "mode": "txt2img", "init_image_key": None, "mask_key": None, "strength": None, "resize_mode": "resize",
    "mask_blur": 0, "paste_back": False,
}
assert list(_SPEC_DEFAULTS) == [
    "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler", "model",
    "request_index", *_TXT2IMG_VALUES, "clip_skip", "loras", "embeddings", "safety",
], "check_request builds ImageSpec values in field order: update it with the fields"
assert all(_SPEC_DEFAULTS[k] == v for k, v in _TXT2IMG_VALUES.items()), "txt2img values are ImageSpec's defaults"


def _safety(value: Any, settings: Settings, index: int | None) -> str:
    """The request's safety policy (None: FARM_SAFETY): a known one, at least as strict as the farm's,
    and (unless ``off``) only on a farm with a safety checker."""
    if value is None:
        return settings.safety
    floor = SAFETY_POLICIES.index(settings.safety)
    if value.__class__ is not str or value not in SAFETY_POLICIES:
        allowed = ", ".join(SAFETY_POLICIES[floor:])
        raise ValidationError("safety", shown(value), f"unknown safety policy; valid policies: {allowed}", index=index)
    if SAFETY_POLICIES.index(value) < floor:
        allowed = ", ".join(SAFETY_POLICIES[floor:])
        raise ValidationError(
            "safety", value, f"must be at least as strict as the farm's FARM_SAFETY={settings.safety}; valid "
            f"policies: {allowed}", index=index,
        )
    if value != "off" and settings.safety_checker is None:
        raise ValidationError(
            "safety", value, "needs a safety checker and this farm has none: set FARM_SAFETY_CHECKER to the "
            "checker's folder (on the submitters and the workers), or use safety=off", index=index,
        )
    return value


def _seeds(request: GenerationRequest, max_images: int, index: int | None) -> list[int]:
    """Per-image seeds: the explicit list, or ``seed, seed+1, …`` (drawn once here when missing)."""
    if request.seeds is not None:
        if not isinstance(request.seeds, (list, tuple)) or not request.seeds:
            raise ValidationError("seeds", shown(request.seeds), "must be a non-empty list of integers", index=index)
        if request.seed is not None:
            raise ValidationError("seed", shown(request.seed), "give either seed or seeds, not both", index=index)
        if request.num_images is not None and request.num_images != len(request.seeds):
            raise ValidationError(
                "num_images",
                shown(request.num_images),
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
        raise ValidationError(field, shown(exc.value), exc.limit, index=index) from None


def _conditioning(request: GenerationRequest, inputs: PreparedInputs, index: int | None) -> dict[str, Any]:
    """Mode, input keys and image options of a request (txt2img when it names no image)."""
    if request.init_image is None:
        if request.mask is not None:
            raise ValidationError("mask", "given", "needs an init_image to inpaint", index=index)
        if request.strength is None and request.mask_blur == 0 and request.paste_back == False and request.resize_mode == "resize":  # noqa: E712
            return _TXT2IMG
        for name, default in (("strength", None), ("mask_blur", 0), ("paste_back", False), ("resize_mode", "resize")):
            if getattr(request, name) != default:
                raise ValidationError(name, shown(getattr(request, name)), "only applies with an init_image", index=index)
        return _TXT2IMG
    if inputs.init is None:
        raise ValidationError(
            "init_image", "not uploaded", "submit it through Farm.submit/submit_many or `farm submit --init-image`", index=index
        )
    from farm.imaging.inputs import RESIZE_MODES

    mode = "inpaint" if request.mask is not None else "img2img"
    strength = request.strength if request.strength is not None else (1.0 if mode == "inpaint" else 0.75)
    strength = _number("strength", strength, 0.0, 1.0, index, message="must be a number between 0 and 1")
    if not isinstance(request.resize_mode, str) or request.resize_mode not in RESIZE_MODES:
        raise ValidationError("resize_mode", shown(request.resize_mode), f"must be one of {', '.join(RESIZE_MODES)}", index=index)
    mask_blur = _int("mask_blur", request.mask_blur, 0, 64, index)
    if not isinstance(request.paste_back, bool):
        raise ValidationError("paste_back", shown(request.paste_back), "must be true or false", index=index)
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
