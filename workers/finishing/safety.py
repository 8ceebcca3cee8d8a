"""The safety checker: each rendered image checked as its request's ``safety`` policy says.

A request (or the farm's ``FARM_SAFETY``) picks one of ``farm.settings.SAFETY_POLICIES``:

- ``off``: not checked (nothing recorded: ``flagged`` and ``safety`` stay NULL);
- ``flag``: checked; the verdict is recorded (``images.flagged``, ``images.safety``) and written into
  the PNG (``Safety: flag, NSFW: true, NSFW score: 0.123`` in ``parameters``; ``flagged`` and
  ``safety_verdict`` in the ``farm`` JSON chunk); the image is stored as rendered;
- ``blur``: as ``flag``, and a flagged image is stored blurred (:func:`blur`, a strong Gaussian
  blur) instead: the unblurred pixels never leave the worker;
- ``drop``: as ``flag``, and a flagged image is not stored at all: it ends ``filtered`` with the
  reason in ``error`` (not failed, never retried), left out of downloads and exports.

:class:`Screen` applies the policy to one encoded PNG on the finisher's threads, before its upload
(``workers.finishing.finisher``): it reads the policy from the PNG's own ``farm`` chunk (the image's
spec), so an ``off`` image costs a scan of its text chunks and nothing else. A ``flag`` image whose
verdict is clean gets its text chunks swapped without re-encoding (``farm.imaging.pnginfo.replace_text``).

The checker (:class:`ClipSafetyChecker`) is diffusers' ``StableDiffusionSafetyChecker`` (CLIP ViT-L/14
vision tower + 17 concept and 3 special-care embeddings with their thresholds), loaded once per worker
process from the operator's folder (``FARM_SAFETY_CHECKER``: ``config.json`` + ``model.safetensors``,
optionally ``preprocessor_config.json``; safetensors only, local files only, fp16 on CUDA). It decides
as diffusers' ``forward`` does and also returns the scores. A worker without one holds an
:class:`AbsentChecker`: an image asking for a check then fails with :class:`SafetyCheckerAbsent`
naming the setting, and is never stored unchecked.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

from PIL import Image, ImageFilter

import farm
from farm.errors import ConfigError
from farm.imaging.pnginfo import FARM_KEY, PARAMETERS_KEY, add_infotext, encode_png, png_text, replace_text, safety_infotext

__all__ = [
    "AbsentChecker", "Checker", "ClipSafetyChecker", "SafetyCheckerAbsent", "Screen", "Screened", "Verdict", "blur",
    "load_checker",
]

log = logging.getLogger("farm.worker.safety")

#: The feature extractor SD1.x pipelines ship (CLIP's 224 px preprocessing), used when the checker's
#: folder has no ``preprocessor_config.json`` of its own.
SHIPPED_PREPROCESSOR = Path(farm.__file__).resolve().parent / "data" / "sd1" / "v1" / "feature_extractor"
#: diffusers raises a concept's score by this after any special-care concept scored above 0.
SPECIAL_CARE_ADJUSTMENT = 0.01
#: The blur's radius, as a fraction of the image's longer side (512 px: radius 32).
BLUR_FRACTION = 1 / 16


class SafetyCheckerAbsent(ConfigError):
    """An image asks for a safety check and this worker has no checker (or could not load it)."""


class Verdict(NamedTuple):
    """One image's verdict: ``flagged`` and the scores behind it (above 0: over a threshold)."""

    flagged: bool
    #: ``nsfw``: the highest concept score; ``special``: the highest special-care score;
    #: ``concepts``/``special_care``: the indices that scored above 0
    scores: dict[str, Any]


class Checker(Protocol):
    """What :class:`Screen` needs of a checker."""

    #: recorded with each verdict (which checker, which weights)
    name: str

    def check(self, images: Sequence[Image.Image]) -> list[Verdict]: ...


class AbsentChecker:
    """The checker of a worker that has none: says so, clearly, for every image that asks."""

    name = "absent"

    def __init__(self, reason: str = "this worker has no safety checker: set FARM_SAFETY_CHECKER to the folder of "
                 "diffusers' StableDiffusionSafetyChecker (config.json + model.safetensors)"):
        self.reason = reason

    def check(self, images: Sequence[Image.Image]) -> list[Verdict]:
        raise SafetyCheckerAbsent(self.reason)


def _weights_digest(path: Path) -> str:
    """The first 10 hex digits of the weights' sha256 (as A1111 names checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


class ClipSafetyChecker:
    """diffusers' ``StableDiffusionSafetyChecker`` from a local folder of safetensors (see the module)."""

    def __init__(self, folder: str | Path, *, device: str = "cpu"):
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        folder = Path(folder).expanduser()
        weights = folder / "model.safetensors"
        if not (folder / "config.json").is_file() or not weights.is_file():
            pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")) if folder.is_dir() else []
            why = f" (found {', '.join(pickles)}: farm never unpickles; convert them to model.safetensors)" if pickles else ""
            raise SafetyCheckerAbsent(
                f"FARM_SAFETY_CHECKER={folder} is not a safety checker folder: it needs config.json and "
                f"model.safetensors{why}"
            )
        self.device = str(device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = StableDiffusionSafetyChecker.from_pretrained(
            folder, use_safetensors=True, local_files_only=True, torch_dtype=self.dtype
        ).to(self.device).eval()
        self.processor = _image_processor(folder if (folder / "preprocessor_config.json").is_file() else SHIPPED_PREPROCESSOR)
        self.name = f"StableDiffusionSafetyChecker@{_weights_digest(weights)}"
        self._lock = threading.Lock()  # one image at a time on the device, whichever thread asks

    def check(self, images: Sequence[Image.Image]) -> list[Verdict]:
        import torch

        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        model = self.model
        with self._lock, torch.no_grad():
            pooled = model.vision_model(pixels.to(self.device, self.dtype))[1]
            embeds = torch.nn.functional.normalize(model.visual_projection(pooled).float())
            special = embeds @ torch.nn.functional.normalize(model.special_care_embeds.float()).T
            concept = embeds @ torch.nn.functional.normalize(model.concept_embeds.float()).T
            special = (special - model.special_care_embeds_weights.float()).cpu()
            concept = (concept - model.concept_embeds_weights.float()).cpu()
        verdicts = []
        for special_row, concept_row in zip(special.tolist(), concept.tolist()):
            # as diffusers' forward: scores rounded to 3 decimals, +0.01 once a special concept is above 0
            special_scores = [round(s, 3) for s in special_row]
            adjust = SPECIAL_CARE_ADJUSTMENT if any(s > 0 for s in special_scores) else 0.0
            concept_scores = [round(c + adjust, 3) for c in concept_row]
            bad = [n for n, c in enumerate(concept_scores) if c > 0]
            verdicts.append(Verdict(bool(bad), {
                "nsfw": max(concept_scores), "special": max(special_scores),
                "concepts": bad, "special_care": [n for n, s in enumerate(special_scores) if s > 0],
            }))
        return verdicts


def _image_processor(folder: Path):
    """CLIP's preprocessing from ``folder`` (the Pillow implementation: no torchvision needed)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the slow processor is the Pillow one
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(folder, local_files_only=True)


def load_checker(folder: str | Path | None, *, device: str = "cpu") -> Checker:
    """The worker's checker: :class:`ClipSafetyChecker` from ``folder`` (FARM_SAFETY_CHECKER), or an
    :class:`AbsentChecker` when there is none or it cannot be loaded (the reason kept, logged once)."""
    if folder is None:
        return AbsentChecker()
    try:
        return ClipSafetyChecker(folder, device=device)
    except SafetyCheckerAbsent as exc:
        log.error("%s", exc)
        return AbsentChecker(str(exc))
    except Exception as exc:  # noqa: BLE001 - a broken folder: images asking for a check fail with why
        log.exception("safety checker %s could not be loaded", folder)
        return AbsentChecker(f"the safety checker in FARM_SAFETY_CHECKER={folder} could not be loaded: {type(exc).__name__}: {exc}")


def blur(image: Image.Image) -> Image.Image:
    """A strong Gaussian blur: radius 1/16 of the longer side (at least 4 px), so nothing but the
    broad colours is left."""
    radius = max(4.0, max(image.size) * BLUR_FRACTION)
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))


@dataclass
class Screened:
    """What :class:`Screen` made of one PNG: the bytes to store (None: dropped), the values to record
    with the image (``flagged``, ``safety``; none for ``off``) and, when dropped, the reason."""

    body: bytes | None
    values: dict[str, Any] = field(default_factory=dict)
    filtered: str | None = None


#: What a policy does with a flagged image (``flag``, and any unflagged image: ``kept``).
_ACTIONS = {"blur": "blurred", "drop": "dropped"}


class Screen:
    """Applies each image's safety policy to its encoded PNG (see the module docstring).

    ``checker``: a :class:`Checker`, or a callable that makes one, called once on first need (the
    worker loads its checker lazily, in the process that uses it)."""

    def __init__(self, checker: Checker | Callable[[], Checker]):
        self._checker = checker if hasattr(checker, "check") else None
        self._make = None if self._checker is not None else checker
        self._lock = threading.Lock()

    @property
    def checker(self) -> Checker:
        if self._checker is None:
            with self._lock:
                if self._checker is None:
                    self._checker = self._make()
        return self._checker

    def __call__(self, body: bytes) -> Screened:
        text = png_text(body)
        spec = json.loads(text.get(FARM_KEY) or "{}")
        policy = spec.get("safety") or "off"
        if policy == "off":
            return Screened(body)
        checker = self.checker
        image = Image.open(io.BytesIO(body))
        image.load()
        [verdict] = checker.check([image])
        action = _ACTIONS.get(policy, "kept") if verdict.flagged else "kept"
        record = {"policy": policy, "flagged": verdict.flagged, "checker": checker.name, "scores": verdict.scores, "action": action}
        values = {"flagged": verdict.flagged, "safety": record}
        if action == "dropped":
            reason = (
                f"filtered by the safety checker (safety=drop): NSFW score {verdict.scores.get('nsfw', 0):+.3f} "
                f"is above its threshold (concepts {verdict.scores.get('concepts', [])}); no PNG was stored"
            )
            return Screened(None, values, reason)
        parameters = add_infotext(text.get(PARAMETERS_KEY, ""), safety_infotext(record))
        spec = {**spec, "flagged": verdict.flagged, "safety_verdict": record}
        if action == "blurred":
            return Screened(encode_png(blur(image), parameters=parameters, spec=spec), values)
        return Screened(replace_text(body, parameters=parameters, spec=spec), values)
