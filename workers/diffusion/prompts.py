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

Two deliberate differences from A1111: the mean in step 4 is taken per prompt and window, not over
the whole batch (A1111's batch-wide mean couples images of a batch; an image here depends only on
its own prompt), and textual-inversion embeddings are expanded by diffusers'
``maybe_convert_prompt`` per piece rather than by A1111's embedding database.

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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from farm.request.prompt_syntax import has_syntax, is_break, parse

__all__ = [
    "COMMA_BACKTRACK",
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


def _pieces(pipe, prompt: str) -> list[tuple[list[int], str, float]]:
    """``(token ids, text, weight)`` per parsed piece of ``prompt``, tokenized piece by piece as A1111 does."""
    parsed = parse(prompt)
    convert = getattr(pipe, "maybe_convert_prompt", None)  # textual inversion multi-vector tokens
    texts = [text if convert is None or is_break(text, w) else convert(text, pipe.tokenizer) for text, w in parsed]
    ids = pipe.tokenizer(texts, truncation=False, add_special_tokens=False).input_ids
    return [(list(tokens), text, weight) for tokens, (text, weight) in zip(ids, parsed)]


def windows(pipe, prompt: str, *, comma_backtrack: int = COMMA_BACKTRACK) -> list[Window]:
    """Cut ``prompt``'s weighted tokens into 75-token windows (port of A1111's ``tokenize_line``)."""
    comma = pipe.tokenizer.get_vocab().get(",</w>")
    done: list[Window] = []
    window = Window()
    last_comma = -1

    def next_window() -> None:
        nonlocal window, last_comma
        done.append(window)
        window = Window()
        last_comma = -1

    for tokens, text, weight in _pieces(pipe, prompt):
        if is_break(text, weight):
            next_window()
            continue
        for token in tokens:
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


def token_count(pipe, prompt: str) -> int:
    """Content tokens of ``prompt`` once its syntax is removed (no start/end tokens, no padding)."""
    return sum(len(tokens) for tokens, text, weight in _pieces(pipe, prompt) if not is_break(text, weight))


def window_count(pipe, prompt: str, negative_prompt: str | None = "") -> int:
    """Windows of 77 positions an image's text takes: the larger of its prompt's and its negative's.

    Images whose counts differ are padded to the same length in one batch, which moves the shorter
    ones' images (measured on the tiny model: up to 16 levels, 1.7 on average); a worker that renders
    a batch in groups of equal ``window_count`` keeps every image the same as when rendered alone.
    Plain prompts of at most 75 tokens take 1.
    """
    return max(len(windows(pipe, prompt)), len(windows(pipe, negative_prompt or "")))


def _plain_fits(pipe, prompt: str) -> bool:
    if has_syntax(prompt):
        return False
    ids = pipe.tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
    return len(ids) <= WINDOW_TOKENS


def needs_embeddings(pipe, prompts: Sequence[str | None], *, clip_skip: int = 1) -> bool:
    """True when any of ``prompts`` (positive or negative) needs :func:`encode_prompts`' own path."""
    return clip_skip != 1 or not all(_plain_fits(pipe, p or "") for p in prompts)


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


def encode_prompts(
    pipe,
    prompts: Sequence[str],
    negative_prompts: Sequence[str | None],
    *,
    clip_skip: int = 1,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(prompt_embeds, negative_prompt_embeds)`` of shape ``(batch, 77 * windows, dim)``, or ``None``.

    ``None`` means the batch needs nothing diffusers does not do itself (all plain, each at most 75
    tokens, ``clip_skip == 1``): pass the strings as before. ``clip_skip`` counts as A1111 does (1 =
    last layer, 2 = penultimate). The text encoder runs where it is; the result goes to ``device``
(default: the text encoder's) in the text encoder's dtype. A ``None`` negative
    prompt is the empty prompt, as in diffusers.
    """
    prompts = list(prompts)
    negatives = ["" if n is None else n for n in negative_prompts]
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    layers = pipe.text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip={clip_skip} must be between 1 and the text encoder's {layers} layers")
    if not needs_embeddings(pipe, prompts + negatives, clip_skip=clip_skip):
        return None

    device = torch.device(device) if device is not None else pipe.text_encoder.device
    per_text = [windows(pipe, text) for text in prompts + negatives]
    rows: list[list[int]] = []
    row_weights: list[list[float]] = []
    for text_windows in per_text:
        for window in text_windows:
            ids, weights = _window_ids(pipe.tokenizer, window)
            rows.append(ids)
            row_weights.append(weights)
    empty_ids, _ = _window_ids(pipe.tokenizer, Window())
    rows.append(empty_ids)  # the padding window, encoded with the rest

    with torch.no_grad():
        z = _encode(pipe, torch.tensor(rows, dtype=torch.long, device=pipe.text_encoder.device), clip_skip)
    empty = z[-1]
    count = max(len(w) for w in per_text)
    embeds: list[torch.Tensor] = []
    row = 0
    for text_windows in per_text:
        parts = []
        for _ in text_windows:
            parts.append(_emphasis(z[row], row_weights[row]))
            row += 1
        parts += [empty] * (count - len(parts))
        embeds.append(torch.cat(parts, dim=0))
    stacked = torch.stack(embeds).to(device=device, dtype=pipe.text_encoder.dtype)
    return stacked[: len(prompts)], stacked[len(prompts) :]
