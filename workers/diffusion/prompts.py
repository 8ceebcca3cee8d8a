"""Prompt embeddings the way AUTOMATIC1111's webui builds them: long prompts, attention weights, clip skip.

:func:`encode_prompts` returns ``None`` when every prompt and negative prompt of a batch is plain
(no syntax, at most 75 tokens) and ``clip_skip`` is 1: the caller then passes the strings to
diffusers, which renders them exactly as before. Otherwise it returns ``(prompt_embeds,
negative_prompt_embeds)`` for ``pipe(prompt_embeds=..., negative_prompt_embeds=...)``, built as
A1111 does (``modules/sd_hijack_clip.py``, emphasis "Original"):

1. :func:`farm.request.prompt_syntax.parse` splits a prompt into weighted pieces; each piece is tokenized on
   its own (no start/end tokens).
2. The tokens are cut into windows of 75. As in A1111 (its default "comma padding backtrack" of 20),
   when a window fills up and a comma came within its last 20 tokens, the text after that comma
   moves to the next window; ``BREAK`` starts a new window. Each window becomes
   ``[BOS] + tokens + [EOS] + [PAD...]`` (77 ids; the pad id is ``tokenizer.pad_token_id``, which is
   the EOS id for SD1's tokenizer, so this is A1111's EOS padding there, and diffusers' own padding).
3. Each window goes through the text encoder on its own 77 positions. ``clip_skip=2`` takes the
   penultimate layer's hidden states and applies the final layer norm (A1111's "Clip skip 2",
   diffusers' ``clip_skip=1``); ``clip_skip=1`` is the last hidden state, as diffusers uses.
4. Emphasis: every token's vector is multiplied by its weight, then the window is rescaled so that
   its mean is what it was before weighting (unless that mean is zero up to rounding, where the
   rescale would be noise over noise). A window whose weights are all 1 is left untouched, so a
   plain window is bit-identical to diffusers' encoding of the same text.
5. The windows are concatenated along the sequence axis (77 x n). Every prompt and negative prompt
   of the batch is padded to the batch's largest window count with the encoding of an empty window
   (``""``, what A1111 pads with), because the UNet takes one tensor for the batch.

Each piece's text is first cleaned as OpenAI CLIP's ``basic_clean`` + ``whitespace_clean`` do
(:func:`workers.diffusion.tokenizer.clean_text`: ``ftfy.fix_text``, HTML entities, whitespace), which
transformers' fast ``CLIPTokenizer`` does not do itself.

Textual-inversion embeddings (``workers.diffusion.embeddings``) are expanded as A1111 does: where a
piece's tokens spell a name the batch's spec lists, they are replaced by the embedding's vectors'
ids (rows appended to the text encoder's token matrix), weighted like the piece
(``(easynegative:1.2)``), and an embedding that does not fit in what is left of a window starts the
next one. Names the spec does not list are ordinary words.

Two deliberate differences from A1111: the mean in step 4 is taken per prompt and window, not over
the whole batch (A1111's batch-wide mean couples images of a batch; an image here depends only on
its own prompt), and only the embeddings recorded in the image's spec at submit are expanded
(A1111 expands any file in its embeddings folder).

:class:`PromptCache` keeps each text's encoded windows per worker, keyed by the text encoder's
identity (the module, its dtype, the LoRA adapters active on it and their scales), the text, clip
skip and the batch's embeddings; with a cache every batch takes this module's path (a plain window
is bit-identical to diffusers' encoding of the same text, see step 4), and a repeated prompt does
not run the text encoder again.

Padding (step 5) changes an image compared with rendering it alone: a short prompt batched with a
150-token one cross-attends over 154 positions instead of 77 (on the tiny model: up to 16 levels, 1.7
on average). Group a batch by :func:`window_count` to keep images independent of their batch mates.

Library gap: compel 2.5.1 was tried on the tiny model and not used. It does long prompts
(``truncate_long_prompts=False``; for a plain 159-token prompt its embedding equalled this module's
exactly) and offers clip skip (``PENULTIMATE_HIDDEN_STATES_NORMALIZED``), but:
(a) its clip skip raises ``AttributeError: 'CLIPTextModel' object has no attribute 'text_model'``
with transformers 5, which flattened ``CLIPTextModel`` (diffusers 0.42.1's own ``clip_skip=`` fails
the same way, which is why this module applies clip skip itself and never passes ``clip_skip`` on);
(b) its syntax is its own (``(word)1.3``, ``word++``, ``.and()``/``.blend()``; ``[word]`` and ``\\(``
mean other things; no ``BREAK``), so A1111 prompts would need a converter;
(c) its weighting maths differ: a weight above 1 scales the distance from the empty prompt's
embedding (``empty + (z - empty) * w``, no mean restoration) and a weight below 1 blends in extra
encodings with the fragment masked out: ``a (red)1.8 circle`` through compel differed from A1111's
``a (red:1.8) circle`` by 2.5 (max abs) on the tiny model, as much as the weighting itself moves it,
so A1111 prompts would not render as in A1111 even with a converter;
(d) it splits long prompts at sentences, phrases or words, not at 75 tokens with A1111's comma
backtrack (the two agree only when a comma happens to sit where both cut).
Using it would mean overriding its core methods, i.e. writing this module inside its internals.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from farm.request.prompt_syntax import has_syntax, is_break, parse
from workers.diffusion.tokenizer import clean_text

__all__ = [
    "COMMA_BACKTRACK",
    "PromptCache",
    "WINDOW_TOKENS",
    "Window",
    "encode_prompts",
    "needs_embeddings",
    "token_count",
    "window_count",
    "windows",
]

#: Content tokens per window (77 positions minus the start and end tokens).
WINDOW_TOKENS = 75
#: A1111's default ``comma_padding_backtrack``: how far back a comma may pull text into the next window.
COMMA_BACKTRACK = 20


@dataclass
class Window:
    """One 75-token window of a prompt: content token ids and their weights (no start/end tokens)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


#: A piece's tokens: token ids, and tuples of ids where an embedding's vectors go (kept together).
Tokens = list["int | tuple[int, ...]"]


def _ids_of(embeddings: Any) -> Mapping[str, Sequence[int]]:
    """``name -> ids`` of a :class:`workers.diffusion.embeddings.TokenEmbeddings` (or a plain mapping)."""
    if not embeddings:
        return {}
    return getattr(embeddings, "ids", embeddings)


def _key_of(embeddings: Any) -> Hashable:
    if not embeddings:
        return ()
    key = getattr(embeddings, "key", None)
    if key is not None:
        return key
    return tuple(sorted((name, tuple(ids)) for name, ids in _ids_of(embeddings).items()))


def _patterns(tokenizer, embeddings: Any) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(the name's token ids, the embedding's ids)``, longest names first (A1111 matches by tokens)."""
    ids = _ids_of(embeddings)
    if not ids:
        return []
    names = list(ids)
    spelled = tokenizer(names, truncation=False, add_special_tokens=False).input_ids
    found = [(tuple(tokens), tuple(ids[name])) for name, tokens in zip(names, spelled) if tokens]
    return sorted(found, key=lambda p: -len(p[0]))


def _expand(tokens: list[int], patterns) -> Tokens:
    """``tokens`` with each spelled-out embedding name replaced by a tuple of its ids."""
    if not patterns:
        return tokens
    out: Tokens = []
    n = 0
    while n < len(tokens):
        for spelled, ids in patterns:
            if tuple(tokens[n : n + len(spelled)]) == spelled:
                out.append(ids)
                n += len(spelled)
                break
        else:
            out.append(tokens[n])
            n += 1
    return out


def _pieces(pipe, prompt: str, embeddings: Any = None) -> list[tuple[Tokens, str, float]]:
    """``(tokens, text, weight)`` per parsed piece of ``prompt``, tokenized piece by piece as A1111 does;
    each piece's text cleaned first (:func:`clean_text`), embedding names expanded."""
    parsed = parse(prompt)
    texts = [text if is_break(text, w) else clean_text(text) for text, w in parsed]
    ids = pipe.tokenizer(texts, truncation=False, add_special_tokens=False).input_ids
    patterns = _patterns(pipe.tokenizer, embeddings)
    return [(_expand(list(tokens), patterns), text, weight) for tokens, (text, weight) in zip(ids, parsed)]


def _size(token: "int | tuple[int, ...]") -> int:
    return len(token) if isinstance(token, tuple) else 1


def windows(pipe, prompt: str, *, comma_backtrack: int = COMMA_BACKTRACK, embeddings: Any = None) -> list[Window]:
    """Cut ``prompt``'s weighted tokens into 75-token windows (port of A1111's ``tokenize_line``).

    ``embeddings`` (name → ids) are expanded where their names are spelled; an embedding's vectors
    stay in one window (one that does not fit in what is left starts the next, as in A1111)."""
    comma = pipe.tokenizer.get_vocab().get(",</w>")
    done: list[Window] = []
    window = Window()
    last_comma = -1

    def next_window() -> None:
        nonlocal window, last_comma
        done.append(window)
        window = Window()
        last_comma = -1

    for tokens, text, weight in _pieces(pipe, prompt, embeddings):
        if is_break(text, weight):
            next_window()
            continue
        for token in tokens:
            if isinstance(token, tuple):  # an embedding: all its vectors in one window
                if len(window.tokens) + len(token) > WINDOW_TOKENS:
                    next_window()
                window.tokens.extend(token)
                window.weights.extend([weight] * len(token))
                continue
            if comma is not None and token == comma:
                last_comma = len(window.tokens)
            elif (
                comma_backtrack
                and len(window.tokens) == WINDOW_TOKENS
                and last_comma != -1
                and len(window.tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved = Window(window.tokens[cut:], window.weights[cut:])
                del window.tokens[cut:], window.weights[cut:]
                next_window()
                window = moved
            if len(window.tokens) == WINDOW_TOKENS:
                next_window()
            window.tokens.append(token)
            window.weights.append(weight)
    if window.tokens or not done:
        done.append(window)
    return done


def token_count(pipe, prompt: str, embeddings: Any = None) -> int:
    """Content tokens of ``prompt`` once its syntax is removed (no start/end tokens, no padding; an
    embedding counts its vectors)."""
    return sum(
        sum(_size(t) for t in tokens) for tokens, text, weight in _pieces(pipe, prompt, embeddings) if not is_break(text, weight)
    )


def window_count(pipe, prompt: str, negative_prompt: str | None = "", embeddings: Any = None) -> int:
    """Windows of 77 positions an image's text takes: the larger of its prompt's and its negative's.

    Images whose counts differ are padded to the same length in one batch, which moves the shorter
    ones' images (measured on the tiny model: up to 16 levels, 1.7 on average); a worker that renders
    a batch in groups of equal ``window_count`` keeps every image the same as when rendered alone.
    Plain prompts of at most 75 tokens take 1.
    """
    return max(
        len(windows(pipe, prompt, embeddings=embeddings)), len(windows(pipe, negative_prompt or "", embeddings=embeddings))
    )


def _plain_fits(pipe, prompt: str) -> bool:
    if has_syntax(prompt):
        return False
    ids = pipe.tokenizer(clean_text(prompt), truncation=False, add_special_tokens=False).input_ids
    return len(ids) <= WINDOW_TOKENS


def needs_embeddings(pipe, prompts: Sequence[str | None], *, clip_skip: int = 1, embeddings: Any = None) -> bool:
    """True when any of ``prompts`` (positive or negative) needs :func:`encode_prompts`' own path
    (always when the batch uses textual-inversion embeddings: diffusers would not expand them)."""
    return clip_skip != 1 or bool(_ids_of(embeddings)) or not all(_plain_fits(pipe, p or "") for p in prompts)


def _window_ids(tokenizer, window: Window) -> tuple[list[int], list[float]]:
    """77 ids ``[BOS] + tokens + [EOS] + [PAD...]`` and their weights (1 on everything added)."""
    size = WINDOW_TOKENS + 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *window.tokens, tokenizer.eos_token_id]
    weights = [1.0, *window.weights, 1.0]
    ids += [pad] * (size - len(ids))
    weights += [1.0] * (size - len(weights))
    return ids, weights


def _encode(pipe, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Run the text encoder over windows ``ids`` (n, 77); clip skip as A1111 and diffusers do."""
    encoder = pipe.text_encoder
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):  # as diffusers' encode_prompt does
        eos = pipe.tokenizer.eos_token_id
        first_eos = (ids == eos).int().argmax(dim=1, keepdim=True)
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] <= first_eos).long()
    if clip_skip == 1:
        return encoder(ids, attention_mask=mask)[0]
    out = encoder(ids, attention_mask=mask, output_hidden_states=True)
    # transformers 5 flattened CLIPTextModel (no .text_model); 4.x keeps the norm under .text_model
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return norm(out.hidden_states[-clip_skip])


def _emphasis(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's "Original" emphasis on one window: scale each token's vector, then restore the mean."""
    if all(w == 1.0 for w in weights):
        return z
    z32 = z.float()
    original_mean = z32.mean()
    z32 = z32 * torch.tensor(weights, dtype=torch.float32, device=z.device)[:, None]
    new_mean = z32.mean()
    # A mean that is rounding noise (a final layer norm with zero bias makes every token's mean 0)
    # would turn the rescale into noise over noise, a factor of any size: leave such a window scaled.
    if new_mean.abs() > MEAN_FLOOR * z32.abs().mean():
        z32 = z32 * (original_mean / new_mean)
    return z32.to(z.dtype)


#: Below this fraction of the mean magnitude, a window's mean counts as zero (see :func:`_emphasis`).
MEAN_FLOOR = 1e-4


class PromptCache:
    """Encoded windows per text, least recently used evicted past ``max_bytes`` or ``max_entries``.

    One per worker (the text encoder's outputs stay on its device, in its dtype). Keys hold the text
    encoder's identity (:func:`encoder_identity`: the module, its dtype, the LoRA adapters active
    on it and their scales), the text, clip skip and the batch's embeddings (``((name, sha256),
    …)``), so a LoRA that touches the text encoder, or another embedding set, never reads an entry
    made without it. ``max_bytes=0`` keeps nothing.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_entries: int = 4096):
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[Hashable, tuple[list[torch.Tensor], int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"PromptCache({len(self)} entries, {self.bytes} bytes, hits={self.hits}, misses={self.misses})"

    def get(self, key: Hashable) -> list[torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, parts: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in parts)
        if size > self.max_bytes or self.max_entries < 1:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (parts, size)
        self.bytes += size
        while self.bytes > self.max_bytes or len(self._entries) > self.max_entries:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def encoder_identity(pipe) -> Hashable:
    """What a text encoder's outputs depend on besides its input: the module itself, its dtype and
    device, and for each peft LoRA layer on it the active adapters, their scales and whether they are
    disabled or merged (``workers.lora.adapters`` switches these per job)."""
    encoder = pipe.text_encoder
    lora = []
    if getattr(encoder, "peft_config", None):
        for name, module in encoder.named_modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and hasattr(module, "active_adapters"):
                active = tuple(module.active_adapters)
                lora.append((
                    name, active, tuple(scaling.get(a) for a in active), bool(getattr(module, "disable_adapters", False)),
                    tuple(getattr(module, "merged_adapters", ()) or ()),
                ))
    return (id(encoder), str(encoder.dtype), str(encoder.device), tuple(lora))


def encode_prompts(
    pipe,
    prompts: Sequence[str],
    negative_prompts: Sequence[str | None],
    *,
    clip_skip: int = 1,
    device: str | torch.device | None = None,
    embeddings: Any = None,
    cache: PromptCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(prompt_embeds, negative_prompt_embeds)`` of shape ``(batch, 77 * windows, dim)``, or ``None``.

    ``None`` means the batch needs nothing diffusers does not do itself (all plain, each at most 75
    tokens, ``clip_skip == 1``, no embeddings, no ``cache``): pass the strings as before.
    ``clip_skip`` counts as A1111 does (1 = last layer, 2 = penultimate). ``embeddings``: the batch's
    textual-inversion embeddings (``workers.diffusion.embeddings.TokenEmbeddings``, or a mapping
    name → ids). ``cache``: a :class:`PromptCache`; texts found there skip the text encoder. The text
    encoder runs where it is; the result goes to ``device`` (default: the text encoder's) in the text
    encoder's dtype. A ``None`` negative prompt is the empty prompt, as in diffusers.
    """
    prompts = list(prompts)
    negatives = ["" if n is None else n for n in negative_prompts]
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    layers = pipe.text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip={clip_skip} must be between 1 and the text encoder's {layers} layers")
    if cache is None and not needs_embeddings(pipe, prompts + negatives, clip_skip=clip_skip, embeddings=embeddings):
        return None

    device = torch.device(device) if device is not None else pipe.text_encoder.device
    texts = prompts + negatives
    if cache is None:
        encoded = _encode_texts(pipe, texts, clip_skip, embeddings)
        empty = encoded.pop()
    else:
        identity = encoder_identity(pipe)
        emb_key = _key_of(embeddings)
        keys = {text: (identity, text, clip_skip, emb_key) for text in dict.fromkeys(texts)}
        empty_key = (identity, "", clip_skip, ())
        found = {text: cache.get(key) for text, key in keys.items()}
        empty_parts = found.get("") if emb_key == () and "" in found else cache.get(empty_key)
        missing = [text for text, parts in found.items() if parts is None]
        if missing or empty_parts is None:
            fresh = _encode_texts(pipe, missing, clip_skip, embeddings, with_empty=empty_parts is None)
            if empty_parts is None:
                empty_parts = [fresh.pop().clone()]
                cache.put(empty_key, empty_parts)
            for text, parts in zip(missing, fresh):
                parts = [p.clone() for p in parts]  # not views of the batch's output
                found[text] = parts
                cache.put(keys[text], parts)
        encoded = [found[text] for text in texts]
        empty = empty_parts[0]
    count = max(len(parts) for parts in encoded)
    embeds = [torch.cat(list(parts) + [empty] * (count - len(parts)), dim=0) for parts in encoded]
    stacked = torch.stack(embeds).to(device=device, dtype=pipe.text_encoder.dtype)
    return stacked[: len(prompts)], stacked[len(prompts) :]


def _encode_texts(pipe, texts: Sequence[str], clip_skip: int, embeddings: Any, *, with_empty: bool = True) -> list:
    """Each text's windows through the text encoder (one call for all), emphasis applied; with
    ``with_empty``, a last item: the empty window's encoding, what shorter texts are padded with."""
    per_text = [windows(pipe, text, embeddings=embeddings) for text in texts]
    rows: list[list[int]] = []
    row_weights: list[list[float]] = []
    for text_windows in per_text:
        for window in text_windows:
            ids, weights = _window_ids(pipe.tokenizer, window)
            rows.append(ids)
            row_weights.append(weights)
    if with_empty:
        empty_ids, _ = _window_ids(pipe.tokenizer, Window())
        rows.append(empty_ids)  # the padding window, encoded with the rest

    with torch.no_grad():
        z = _encode(pipe, torch.tensor(rows, dtype=torch.long, device=pipe.text_encoder.device), clip_skip)
    out: list[list[torch.Tensor]] = []
    row = 0
    for text_windows in per_text:
        parts = []
        for _ in text_windows:
            parts.append(_emphasis(z[row], row_weights[row]))
            row += 1
        out.append(parts)
    if with_empty:
        out.append(z[-1])
    return out
