"""Textual-inversion embeddings on a worker: fetched by sha256, cached, added to the text encoder.

An image's spec lists the embeddings its prompts use (``ImageSpec.embeddings``: ``((name, sha256),
…)``, resolved at submit by ``farm.embeddings``). Before a batch is encoded,
:meth:`EmbeddingStore.activate` makes each of them available and returns a :class:`TokenEmbeddings`
for :mod:`workers.diffusion.prompts`:

* **bytes**: from the worker's on-disk cache (``<data>/cache/embeddings``, the LoRA disk cache's
  code: sha256-verified, LRU-evicted), else storage (``embeddings/<sha256>.safetensors``);
  parsed with ``safetensors`` (never a pickle) and kept in memory, least recently used evicted past
  ``max_loaded``;
* **rows**: the vectors are appended to the text encoder's token-embedding matrix as new rows
  (ids past CLIP's 49,408). The tokenizer is not changed: only prompts whose spec lists the
  embedding get its ids (:func:`workers.diffusion.prompts.windows` replaces the name's tokens by
  them, A1111's way), so a word that happens to be a registered name stays a word in other images;
* the rows of embeddings no batch asked for recently are dropped when more than ``max_loaded``
  are loaded (the matrix is rebuilt: base rows untouched, bit for bit).

The vectors' width must be the text encoder's (768 for SD1.x); a file that does not fit fails its
images with a clear reason (``EmbeddingError``), never the worker.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from farm.errors import FarmError, RenderError

log = logging.getLogger(__name__)

__all__ = ["EmbeddingError", "EmbeddingStore", "TokenEmbeddings", "parse_embedding"]


class EmbeddingError(RenderError):
    """An embedding cannot be used by this worker's model (missing, damaged, wrong width): a
    :class:`~farm.errors.RenderError`, so the batch's images fail with this reason, not the worker."""


@dataclass(frozen=True)
class TokenEmbeddings:
    """The embeddings a batch may use: ``ids`` (name → rows of the text encoder's embedding matrix)
    and ``key`` (``((name, sha256), …)``: what the encoding depends on, for the prompt cache)."""

    ids: dict[str, tuple[int, ...]] = field(default_factory=dict)
    key: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.ids)


def parse_embedding(data: bytes, label: str = "embedding") -> torch.Tensor:
    """The ``[n, width]`` float32 vectors of an embedding file (A1111 or diffusers layout, safetensors)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error, one line
        raise EmbeddingError(f"{label} is not a readable safetensors file: {exc}") from None
    if "emb_params" in tensors:
        vectors = tensors["emb_params"]
    else:
        a1111 = [k for k in tensors if k.startswith("string_to_param.")]
        if len(a1111) == 1:
            vectors = tensors[a1111[0]]
        elif len(tensors) == 1:
            vectors = next(iter(tensors.values()))
        else:
            raise EmbeddingError(f"{label} holds tensors {sorted(tensors)[:6]}: expected one embedding tensor")
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[0] < 1 or not vectors.is_floating_point():
        raise EmbeddingError(f"{label} has a tensor of shape {list(vectors.shape)} ({vectors.dtype}); expected [n, width]")
    return vectors.float().contiguous()


class EmbeddingStore:
    """The embeddings loaded into one pipeline's text encoder. One batch at a time (a lock)."""

    def __init__(self, pipe: Any, fetch: Callable[[str], bytes], *, max_loaded: int = 64):
        if max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded}: keep at least one embedding loaded")
        #: A ``StableDiffusionPipeline`` (a ``LoadedModel`` is unwrapped).
        self.pipe = getattr(pipe, "pipe", pipe)
        #: ``sha256 -> bytes`` (the disk cache, else storage)
        self.fetch = fetch
        self.max_loaded = int(max_loaded)
        self._vectors: OrderedDict[str, torch.Tensor] = OrderedDict()  # sha -> [n, width], LRU first
        self._rows: dict[str, tuple[int, ...]] = {}  # sha -> its ids in the embedding matrix
        self._base_rows: int | None = None
        self._lock = threading.Lock()
        #: how each activation was served, for logs and tests: sha -> "memory" | "loaded"
        self.served: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"EmbeddingStore(max_loaded={self.max_loaded}, loaded={[s[:12] for s in self._vectors]})"

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._vectors)

    def activate(self, embeddings: Sequence[tuple[str, str]] | Sequence[Any]) -> TokenEmbeddings:
        """Make ``((name, sha256), …)`` usable; returns their token ids for the prompt encoder."""
        pairs = [(str(e["name"]), str(e["sha256"])) if isinstance(e, dict) else (str(e[0]), str(e[1])) for e in embeddings or ()]
        if not pairs:
            return TokenEmbeddings()
        shas = list(dict.fromkeys(sha for _, sha in pairs))
        if len(shas) > self.max_loaded:
            raise EmbeddingError(
                f"the batch uses {len(shas)} embeddings; this worker keeps at most {self.max_loaded} loaded"
            )
        with self._lock:
            served = {}
            changed = False
            for sha in shas:
                if sha in self._vectors:
                    served[sha] = "memory"
                    self._vectors.move_to_end(sha)
                    continue
                self._vectors[sha] = self._load(sha)
                served[sha] = "loaded"
                changed = True
            while len(self._vectors) > self.max_loaded:
                victim = next(s for s in self._vectors if s not in served)
                del self._vectors[victim]
                changed = True
                log.info("embedding %s dropped (least recently used)", victim[:12])
            if changed or any(sha not in self._rows for sha in shas):
                self._rebuild()
            self.served = served
            return TokenEmbeddings(
                ids={name: self._rows[sha] for name, sha in pairs}, key=tuple(sorted(set(pairs))),
            )

    # -- internals ------------------------------------------------------------------------------

    def _load(self, sha: str) -> torch.Tensor:
        try:
            data = self.fetch(sha)
        except (FarmError, KeyError, OSError) as exc:  # missing from storage, damaged, storage away
            raise EmbeddingError(f"embedding {sha} cannot be fetched: {type(exc).__name__}: {exc}") from exc
        vectors = parse_embedding(data, f"embedding {sha[:12]}")
        width = self._matrix().weight.shape[1]
        if vectors.shape[1] != width:
            raise EmbeddingError(
                f"embedding {sha[:12]} has vectors of width {vectors.shape[1]}; this model's text encoder takes {width}"
            )
        log.info("embedding %s loaded (%d vectors)", sha[:12], vectors.shape[0])
        return vectors

    def _matrix(self) -> torch.nn.Embedding:
        return self.pipe.text_encoder.get_input_embeddings()

    def _rebuild(self) -> None:
        """The matrix = the model's own rows, then the loaded embeddings' vectors, in LRU order."""
        matrix = self._matrix()
        weight = matrix.weight
        if self._base_rows is None:
            self._base_rows = weight.shape[0]
        base = weight.data[: self._base_rows]
        extra = [v.to(device=weight.device, dtype=weight.dtype) for v in self._vectors.values()]
        rows: dict[str, tuple[int, ...]] = {}
        start = self._base_rows
        for sha, vectors in self._vectors.items():
            rows[sha] = tuple(range(start, start + vectors.shape[0]))
            start += vectors.shape[0]
        with torch.no_grad():
            new = torch.cat([base, *extra]) if extra else base.clone()
        matrix.weight = torch.nn.Parameter(new, requires_grad=False)
        matrix.num_embeddings = new.shape[0]
        self._rows = rows
