"""Several LoRAs per job on one loaded pipeline: named peft adapters, kept loaded between jobs.

:class:`AdapterSet` wraps a worker's pipeline. Each job calls :meth:`AdapterSet.activate` with its
LoRAs (sha256, local file from :class:`workers.lora.disk_cache.LoraDiskCache`, weight):

* a LoRA already loaded is reused (``"cache"``: switching costs one ``set_adapters``, a few ms);
  a missing one is loaded as adapter ``l_<sha[:16]>`` (``"loaded"``: ~0.1-0.3 s on a CPU);
* at most ``max_loaded`` adapters stay loaded; past that the least recently used ones are deleted
  (never one the job asks for);
* ``pipe.set_adapters(names, adapter_weights=weights)`` then activates exactly the job's set;
  loading adapters one after another leaves only the last active, so this call is always made;
* ``activate([])`` disables every adapter (``pipe.disable_lora()``): the base model renders
  bit-exactly as if no LoRA had ever been loaded, and the adapters stay loaded for later jobs.

The base weights are never touched (no fuse/unfuse, which drifts by ~1e-6) and never reloaded.
:meth:`loaded` is what the worker advertises for routing: the LoRAs it can serve without loading.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from workers.lora.disk_cache import LoraError

log = logging.getLogger(__name__)

#: diffusers warnings that every UNet-only LoRA triggers; they say nothing about a problem.
_NOISE = ("No LoRA keys associated to CLIPTextModel",)
_PEFT_NOISE = r"(Already found a `peft_config` attribute|Adapter .* was active which is now deleted)"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_NOISE)


_noise_filter = _DropNoise()


def adapter_name(sha256: str) -> str:
    """The peft adapter name of a LoRA: ``l_`` + the first 16 hex digits of its sha256."""
    return "l_" + sha256[:16]


class AdapterSet:
    """The LoRA adapters loaded into one pipeline, least recently used first. One job at a time
    (calls are serialised by a lock)."""

    def __init__(self, pipe: Any, *, max_loaded: int):
        if max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded}: keep at least one LoRA loaded")
        #: A ``StableDiffusionPipeline`` (a :class:`workers.diffusion.pipeline.LoadedModel` is unwrapped).
        self.pipe = getattr(pipe, "pipe", pipe)
        self.max_loaded = int(max_loaded)
        self._loaded: OrderedDict[str, str] = OrderedDict()  # sha256 -> adapter name, LRU first
        self._enabled = True  # whether the pipeline's LoRA layers are enabled
        self._active: tuple[tuple[str, float], ...] | None = None  # last set_adapters, if still valid
        self._lock = threading.Lock()
        for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft"):
            logging.getLogger(name).addFilter(_noise_filter)

    def __repr__(self) -> str:
        return f"AdapterSet(max_loaded={self.max_loaded}, loaded={[s[:12] for s in self._loaded]})"

    def loaded(self) -> list[str]:
        """sha256s of the LoRAs loaded in the pipeline, most recently used last."""
        with self._lock:
            return list(self._loaded)

    def activate(self, loras: list[tuple[str, Path, float]]) -> dict[str, str]:
        """Make exactly ``loras`` (sha256, local file, weight) active; ``[]`` renders the base model.

        Returns ``{sha256: "cache" | "loaded"}`` (``"cache"``: it was already loaded). Raises
        :class:`LoraError` when the job asks for more LoRAs than ``max_loaded`` or a file cannot be
        loaded into this model (the adapters loaded before stay usable), ``ValueError`` for a sha
        given twice or a weight that is not a finite number.
        """
        shas = [sha for sha, _, _ in loras]
        if len(set(shas)) != len(shas):
            raise ValueError(f"a LoRA is listed twice in {[s[:12] for s in shas]}: give each once, with one weight")
        weights = []
        for sha, _, weight in loras:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"LoRA {sha[:12]} weight={weight!r}: must be a finite number")
            weights.append(float(weight))
        if len(loras) > self.max_loaded:
            raise LoraError(
                f"the job uses {len(loras)} LoRAs but this worker keeps at most {self.max_loaded} loaded; "
                "use fewer LoRAs per job or raise the worker's adapter limit"
            )
        with self._lock:
            if not loras:
                self._disable()
                return {}
            served: dict[str, str] = {}
            for sha, path, _ in loras:
                if sha in self._loaded:
                    served[sha] = "cache"
                    continue
                self._make_room(keep=set(shas))
                self._load(sha, Path(path))
                served[sha] = "loaded"
            for sha in shas:  # most recently used last, in the job's order
                self._loaded.move_to_end(sha)
            wanted = tuple(zip((self._loaded[s] for s in shas), weights))
            if not self._enabled:
                self.pipe.enable_lora()
                self._enabled = True
            if wanted != self._active:
                self.pipe.set_adapters([n for n, _ in wanted], adapter_weights=[w for _, w in wanted])
                self._active = wanted
            return {sha: served[sha] for sha in shas}

    def clear(self) -> None:
        """Delete every loaded adapter (e.g. before the worker switches to another base model)."""
        with self._lock:
            while self._loaded:
                self._unload(next(iter(self._loaded)))

    # -- internals ------------------------------------------------------------------------------

    def _present(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def _disable(self) -> None:
        if self._loaded and self._enabled:
            self.pipe.disable_lora()
            self._enabled = False

    def _make_room(self, *, keep: set[str]) -> None:
        while len(self._loaded) >= self.max_loaded:
            victim = next((s for s in self._loaded if s not in keep), None)
            if victim is None:  # cannot happen: activate checks len(loras) <= max_loaded
                raise LoraError(f"cannot load more than {self.max_loaded} LoRAs at once")
            self._unload(victim)

    def _unload(self, sha: str) -> None:
        name = self._loaded.pop(sha)
        self._active = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PEFT_NOISE)
            self.pipe.delete_adapters([name])
        log.info("LoRA %s unloaded (adapter %s)", sha[:12], name)

    def _load(self, sha: str, path: Path) -> None:
        name = adapter_name(sha)
        self._active = None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_PEFT_NOISE)
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:
            self._discard(name)
            raise LoraError(
                f"cannot load LoRA {sha} from {path} into this model: {type(exc).__name__}: {exc}; "
                "is it an SD1.x LoRA (not SDXL/SD2), in diffusers or kohya safetensors format?"
            ) from exc
        if name not in self._present():
            raise LoraError(
                f"LoRA {sha} ({path}) matched no layer of this model: is it an SD1.x LoRA (not SDXL/SD2)?"
            )
        self._loaded[sha] = name
        log.info("LoRA %s loaded from %s (adapter %s)", sha[:12], path, name)

    def _discard(self, name: str) -> None:
        """Remove whatever a failed load left of adapter ``name``."""
        try:
            if name in self._present():
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_PEFT_NOISE)
                    self.pipe.delete_adapters([name])
        except Exception:  # the original error is the one worth reporting
            log.warning("could not clean up adapter %s after a failed load", name, exc_info=True)
