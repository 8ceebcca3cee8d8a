"""The worker's prompt-embedding cache (workers.diffusion.prompts.PromptCache) and prompt cleaning
(workers.diffusion.tokenizer.clean_text) on the tiny model (CPU, offline)."""

from __future__ import annotations

import copy

import pytest
import torch

from farm.settings import BUILTIN_TINY
from workers.diffusion.pipeline import load_pipeline
from workers.diffusion.prompts import PromptCache, encode_prompts, encoder_identity, windows
from workers.diffusion.tokenizer import clean_text

LONG = "a photo of a red circle on a blue background, " * 9


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_pipeline("tiny", BUILTIN_TINY, models_dir=tmp_path_factory.mktemp("models"), device="cpu")


@pytest.fixture
def calls(model):
    """Rows (77-token windows) the text encoder ran over, call by call."""
    seen: list[int] = []
    handle = model.pipe.text_encoder.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0].shape[0]))
    yield seen
    handle.remove()


def test_a_repeated_prompt_skips_the_text_encoder_and_gives_the_same_tensors(model, calls):
    pipe, cache = model.pipe, PromptCache()
    first = encode_prompts(pipe, ["a (red:1.3) circle", LONG], ["blurry", ""], cache=cache)
    assert len(calls) == 1
    again = encode_prompts(pipe, ["a (red:1.3) circle", LONG], ["blurry", ""], cache=cache)
    assert len(calls) == 1, "every text was cached: the encoder did not run"
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert cache.hits >= 4
    # a batch with one new text encodes that text alone (one window plus nothing else)
    mixed = encode_prompts(pipe, ["a (red:1.3) circle", "a green square"], ["blurry", "blurry"], cache=cache)
    assert calls[1:] == [1]
    assert torch.equal(mixed[0][0], first[0][0][:77])  # the cached text's first (only) window
    # the same results as without a cache
    uncached = encode_prompts(pipe, ["a (red:1.3) circle", LONG], ["blurry", ""])
    assert torch.allclose(uncached[0], first[0], atol=1e-6) and torch.allclose(uncached[1], first[1], atol=1e-6)


def test_with_a_cache_plain_prompts_encode_exactly_as_diffusers(model):
    """Workers keep a cache, so every batch takes this path: a plain prompt must not change."""
    pipe = model.pipe
    ours, our_negative = encode_prompts(pipe, ["a red circle on a blue background"], ["blurry"], cache=PromptCache())
    with torch.no_grad():
        theirs, their_negative = pipe.encode_prompt(
            "a red circle on a blue background", "cpu", 1, True, negative_prompt="blurry"
        )
    assert torch.equal(ours, theirs) and torch.equal(our_negative, their_negative)


def test_clip_skip_embeddings_and_lora_are_part_of_the_key(model, calls, tmp_path):
    pipe, cache = model.pipe, PromptCache()
    base = encode_prompts(pipe, ["a red circle"], [""], cache=cache)
    encode_prompts(pipe, ["a red circle"], [""], cache=cache, clip_skip=2)
    assert len(calls) == 2  # another clip skip: encoded again
    # another embedding set: encoded again
    encode_prompts(pipe, ["a red circle"], [""], cache=cache, embeddings={"x": (5,)})
    assert len(calls) == 3
    encode_prompts(pipe, ["a red circle"], [""], cache=cache)
    assert len(calls) == 3

    # a LoRA on the text encoder (saved and loaded as workers load LoRAs)
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from workers.lora.adapters import AdapterSet

    donor = copy.deepcopy(pipe.text_encoder)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name="x")
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), text_encoder_lora_layers=get_peft_model_state_dict(donor, adapter_name="x"), safe_serialization=True
    )
    adapters = AdapterSet(pipe, max_loaded=2)
    try:
        adapters.activate([("ab" * 32, tmp_path / "pytorch_lora_weights.safetensors", 1.0)])
        with_lora = encode_prompts(pipe, ["a red circle"], [""], cache=cache)
        assert len(calls) == 4 and not torch.allclose(with_lora[0], base[0])
        adapters.activate([("ab" * 32, tmp_path / "pytorch_lora_weights.safetensors", 0.5)])
        encode_prompts(pipe, ["a red circle"], [""], cache=cache)
        assert len(calls) == 5  # another weight
        adapters.activate([])  # disabled: the base model's encoding again
        off = encode_prompts(pipe, ["a red circle"], [""], cache=cache)
        assert torch.equal(off[0], base[0])
    finally:
        adapters.clear()
    assert encoder_identity(pipe)[3] == ()


def test_the_cache_is_bounded(model):
    pipe = model.pipe
    by_count = PromptCache(max_entries=3)
    for n in range(6):
        encode_prompts(pipe, [f"a red circle {n}"], [""], cache=by_count)
    assert len(by_count) == 3
    window_bytes = 77 * pipe.text_encoder.config.hidden_size * 4
    by_bytes = PromptCache(max_bytes=2 * window_bytes)
    for n in range(4):
        encode_prompts(pipe, [f"a blue square {n}"], [""], cache=by_bytes)
    assert len(by_bytes) == 2 and by_bytes.bytes <= 2 * window_bytes
    off = PromptCache(max_bytes=0)
    encode_prompts(pipe, ["a red circle"], [""], cache=off)
    assert len(off) == 0


# -- prompt cleaning (OpenAI CLIP's basic_clean + whitespace_clean) --------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("caf&amp;eacute;  \n  cat", "café cat"),  # HTML entities, escaped twice; whitespace runs
        ("cafÃ© au lait", "café au lait"),  # mojibake (UTF-8 read as Latin-1)
        ("ﬁne Ｆｕｌｌ “quoted”", 'fine Full "quoted"'),  # ligature, fullwidth, curly quotes
        ("  a red\tcircle  ", "a red circle"),
        ("a red circle", "a red circle"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_prompts_are_cleaned_before_tokenizing(model):
    pipe = model.pipe
    assert [w.tokens for w in windows(pipe, "caf&amp;eacute;  \n  cat")] == [w.tokens for w in windows(pipe, "café cat")]
    assert [w.tokens for w in windows(pipe, "(cafÃ©:1.2) cat")] == [w.tokens for w in windows(pipe, "(café:1.2) cat")]
