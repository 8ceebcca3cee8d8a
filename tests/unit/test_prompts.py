"""workers.diffusion.prompts on the tiny model: long prompts in 75-token windows, A1111 weights, clip skip (CPU, offline)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from farm.settings import BUILTIN_TINY
from workers.diffusion.pipeline import LoadedModel, load_pipeline
from workers.diffusion.prompts import WINDOW_TOKENS, encode_prompts, needs_embeddings, token_count, window_count, windows

PLAIN = "a red circle on a blue background"
#: 11 tokens a sentence, 13 times: 143 tokens, then 15 words (one token each) that the long-prompt tests
#: change. The tiny random model is not very sensitive to text (changing one word of a short prompt
#: moves its image by ~0.3-0.8 levels on average), so the tail is 15 words rather than 3.
BASE = "a photo of a red circle on a blue background, " * 13
LONG_A = BASE + "green star sky night moon cat dog bird fish horse cow sheep lion tiger bear"
LONG_B = BASE + "yellow tree snow day sun owl duck man woman boy girl child person people face"
STEPS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_pipeline("tiny", BUILTIN_TINY, models_dir=tmp_path_factory.mktemp("models"), device="cpu")


def _render(
    model: LoadedModel,
    prompts: Sequence[str],
    negatives: Sequence[str] | None = None,
    *,
    clip_skip: int = 1,
    seed: int = 0,
    plain_diffusers: bool = False,
) -> list[np.ndarray]:
    """Render as workers.diffusion.render does: embeddings when encode_prompts gives them, else the strings."""
    pipe = model.pipe
    negatives = list(negatives) if negatives is not None else [""] * len(prompts)
    embeds = None if plain_diffusers else encode_prompts(pipe, prompts, negatives, clip_skip=clip_skip, device=pipe.device)
    text = (
        {"prompt": list(prompts), "negative_prompt": negatives}
        if embeds is None
        else {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
    )
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    with torch.inference_mode():
        images = pipe(num_inference_steps=STEPS, width=64, height=64, generator=generators, **text).images
    return [np.asarray(image).astype(np.int16) for image in images]


def _levels(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """Max and mean absolute difference in uint8 levels."""
    diff = np.abs(a - b)
    return int(diff.max()), float(diff.mean())


# -- (a) plain prompts keep diffusers' own path -------------------------------------------------------


def test_plain_batch_returns_none(model: LoadedModel) -> None:
    pipe = model.pipe
    assert encode_prompts(pipe, [PLAIN], [""], device="cpu") is None
    assert encode_prompts(pipe, [PLAIN, "a cat"], ["blurry", None], device="cpu") is None
    # literal brackets that A1111 reads as plain text stay plain
    assert encode_prompts(pipe, ["x)) 16:9"], [""], device="cpu") is None
    # any syntax, a long text (prompt or negative) or clip skip switches to embeddings
    assert encode_prompts(pipe, [PLAIN], ["(blurry)"], device="cpu") is not None
    assert encode_prompts(pipe, [PLAIN], [LONG_A], device="cpu") is not None
    assert encode_prompts(pipe, [PLAIN], [""], clip_skip=2, device="cpu") is not None
    assert not needs_embeddings(pipe, ["a " * WINDOW_TOKENS])
    assert needs_embeddings(pipe, ["a " * (WINDOW_TOKENS + 1)])


def test_plain_window_equals_diffusers_encoding(model: LoadedModel) -> None:
    """In a batch that needs embeddings, a plain prompt's embedding is exactly diffusers' own."""
    pipe = model.pipe
    prompt_embeds, negative_embeds = encode_prompts(pipe, [PLAIN, "a (red:1.5) cat"], ["", "blurry"], device="cpu")
    with torch.no_grad():
        reference, reference_negative = pipe.encode_prompt(
            [PLAIN, "a cat"], "cpu", 1, True, negative_prompt=["", "blurry"]
        )
    assert prompt_embeds.shape == negative_embeds.shape == (2, 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(prompt_embeds[0], reference[0])
    assert torch.equal(negative_embeds, reference_negative)
    assert not torch.equal(prompt_embeds[1], reference[1])


def test_token_count_ignores_syntax(model: LoadedModel) -> None:
    pipe = model.pipe
    assert token_count(pipe, PLAIN) == 7
    assert token_count(pipe, "a (red:1.5) circle on a [blue] background") == 7
    assert token_count(pipe, "((a red)) circle BREAK on a blue background") == 7
    assert token_count(pipe, LONG_A) == 158


# -- (b) weights ------------------------------------------------------------------------------------


def test_weight_changes_the_embedding_more_the_further_from_one(model: LoadedModel) -> None:
    pipe = model.pipe
    prompts = [PLAIN, "a (red) circle on a blue background", "a (red:1.8) circle on a blue background",
               "a [red] circle on a blue background", "a (red:1.0) circle on a blue background"]
    embeds, _ = encode_prompts(pipe, prompts, [""] * len(prompts), device="cpu")
    moved = [float((embeds[i] - embeds[0]).abs().max()) for i in range(len(prompts))]
    assert moved[4] == 0.0  # weight 1 is neutral
    assert 0 < moved[1] < moved[2]  # 1.1 moves it, 1.8 moves it more
    assert moved[3] > 0
    # A1111's "Original" emphasis keeps the mean of the window
    assert float(embeds[2].mean()) == pytest.approx(float(embeds[0].mean()), rel=1e-4, abs=1e-6)


def test_weighted_word_changes_the_image_and_weight_one_does_not(model: LoadedModel) -> None:
    plain = _render(model, [PLAIN])[0]
    neutral = _render(model, ["a (red:1.0) circle on a blue background"])[0]
    assert _levels(plain, neutral)[0] <= 1
    # the further the weight from 1, the more the image moves (tiny model, measured mean levels
    # 0.015 / 0.18 / 1.08 at 1.1 / 1.8 / 3, against 0.81 for swapping "red" for "green")
    moved = [_levels(plain, _render(model, [f"a (red:{w}) circle on a blue background"])[0]) for w in ("1.1", "1.8", "3")]
    assert 0 < moved[0][1] < moved[1][1] < moved[2][1], moved
    assert moved[2][0] > 3, moved


# -- (c) long prompts -------------------------------------------------------------------------------


def test_long_prompt_keeps_its_last_words(model: LoadedModel) -> None:
    pipe = model.pipe
    assert token_count(pipe, LONG_A) > 2 * WINDOW_TOKENS - 10
    assert [len(w.tokens) for w in windows(pipe, LONG_A)] == [66, 66, 26]  # cut after commas
    a, b = _render(model, [LONG_A])[0], _render(model, [LONG_B])[0]
    biggest, mean = _levels(a, b)
    assert biggest >= 3 and mean > 0.3, (biggest, mean)  # measured 5 and 0.76
    # plain diffusers truncates at 77 tokens: the two prompts render the same image
    ta, tb = _render(model, [LONG_A], plain_diffusers=True)[0], _render(model, [LONG_B], plain_diffusers=True)[0]
    assert np.array_equal(ta, tb)


def test_windows_follow_a1111(model: LoadedModel) -> None:
    pipe = model.pipe
    # no comma: hard cut at 75
    assert [len(w.tokens) for w in windows(pipe, "a " * 160)] == [75, 75, 10]
    # BREAK starts a new window; an empty prompt is one empty window
    assert [len(w.tokens) for w in windows(pipe, "a red BREAK blue")] == [2, 1]
    assert [len(w.tokens) for w in windows(pipe, "")] == [0]
    assert window_count(pipe, PLAIN) == window_count(pipe, "", None) == 1
    # weights travel with their tokens
    (window,) = windows(pipe, "a (red:1.5) circle")
    assert window.weights == [1.0, 1.5, 1.0]


# -- (d) clip skip ----------------------------------------------------------------------------------


def test_clip_skip_two_is_the_normed_penultimate_layer(model: LoadedModel) -> None:
    pipe = model.pipe
    skipped, _ = encode_prompts(pipe, [PLAIN], [""], clip_skip=2, device="cpu")
    ids = pipe.tokenizer(PLAIN, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        expected = pipe.text_encoder.final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(skipped, expected)
    assert not torch.allclose(skipped, out.last_hidden_state)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompts(pipe, [PLAIN], [""], clip_skip=0, device="cpu")


def test_clip_skip_changes_the_image(model: LoadedModel) -> None:
    one = _render(model, [PLAIN], clip_skip=1)[0]
    two = _render(model, [PLAIN], clip_skip=2)[0]
    biggest, mean = _levels(one, two)
    assert biggest > 10 and mean > 1, (biggest, mean)


# -- (e) mixed batch --------------------------------------------------------------------------------


def test_batch_of_long_and_short_prompts_with_uneven_negatives(model: LoadedModel) -> None:
    pipe = model.pipe
    prompts = [LONG_A, "a (cat:1.3)"]
    negatives = ["", "(blurry:1.2), " + "dark " * 90]  # 2 windows
    prompt_embeds, negative_embeds = encode_prompts(pipe, prompts, negatives, device="cpu")
    hidden = pipe.text_encoder.config.hidden_size
    assert prompt_embeds.shape == negative_embeds.shape == (2, 3 * 77, hidden)
    # the padding is the empty prompt's window
    with torch.no_grad():
        empty = pipe.encode_prompt([""], "cpu", 1, False)[0][0]
    # (within float rounding: the encoder ran on a batch of another size, whose CPU kernels may
    # sum in another order)
    same = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-5)  # noqa: E731
    assert same(prompt_embeds[1, 77:154], empty) and same(prompt_embeds[1, 154:], empty)
    assert same(negative_embeds[0, 77:], torch.cat([empty, empty]))

    batch = _render(model, prompts, negatives)
    assert len(batch) == 2 and batch[0].shape == (64, 64, 3)
    # the long prompt's image is the same alone (its own window count is the batch's) ...
    assert [window_count(pipe, p, n) for p, n in zip(prompts, negatives)] == [3, 2]
    alone = _render(model, [LONG_A], [""])[0]
    assert _levels(batch[0], alone)[0] <= 1
    # ... the short one's is not: padding from 2 to 3 windows moves it (why a worker groups by window_count)
    short_alone = _render(model, prompts[1:], negatives[1:], seed=1)[0]
    assert _levels(batch[1], short_alone)[1] > 0.3  # measured max 16, mean 1.7


# -- (f) negative prompts ---------------------------------------------------------------------------


def test_negative_prompt_syntax(model: LoadedModel) -> None:
    plain = _render(model, [PLAIN], ["blurry dark"])[0]
    neutral = _render(model, [PLAIN], ["(blurry:1.0) dark"])[0]
    assert _levels(plain, neutral)[0] <= 1
    moved = [_levels(plain, _render(model, [PLAIN], [f"(blurry:{w}) dark"])[0]) for w in ("1.1", "1.8", "3")]
    assert 0 < moved[0][1] < moved[1][1] < moved[2][1], moved
    assert moved[2][0] > 3, moved


def test_the_render_path_keeps_a_short_prompt_the_same_beside_a_long_one(model: LoadedModel) -> None:
    """render_batch splits a batch by window count, so a short prompt batched with a long one
    renders exactly as alone (padding both to the long one's length would move it)."""
    from farm.request.spec import ImageSpec
    from workers.diffusion.render import render_batch

    def spec(prompt: str, seed: int) -> ImageSpec:
        return ImageSpec(prompt=prompt, negative_prompt="", seed=seed, steps=4, guidance_scale=7.5, width=64,
                         height=64, scheduler="euler", model="tiny")

    long_prompt = ", ".join(["a red circle on a blue background"] * 14)
    short = spec("a (green:1.3) square", 2)
    together = render_batch(model, [spec(long_prompt, 1), short], base_scheduler_config=model.scheduler_config)
    alone = render_batch(model, [short], base_scheduler_config=model.scheduler_config)
    assert np.array_equal(np.asarray(together.images[1].image), np.asarray(alone.images[0].image))
    assert len(together.images) == 2


def test_emphasis_on_a_window_whose_mean_is_zero_stays_bounded() -> None:
    """A final layer norm without bias gives every token a mean of 0: A1111's rescale would divide
    rounding noise by rounding noise (factors of thousands); the window is only scaled instead."""
    from workers.diffusion.prompts import _emphasis

    torch.manual_seed(0)
    z = torch.nn.functional.layer_norm(torch.randn(77, 32), (32,))  # each row's mean is 0
    weights = [1.0] * 77
    weights[3] = 1.1
    out = _emphasis(z, weights)
    assert float(out.abs().max()) <= 1.1 * float(z.abs().max()) + 1e-6
    assert torch.allclose(out[3], z[3] * 1.1) and torch.equal(out[4], z[4])
    # with a real mean, the mean is restored as A1111 does
    shifted = z + 0.3
    restored = _emphasis(shifted, weights)
    assert float(restored.mean()) == pytest.approx(float(shifted.mean()), rel=1e-5)
