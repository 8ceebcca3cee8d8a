"""workers.diffusion.tiny: the built-in tiny random SD1.x pipeline (CPU only, no download)."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from workers.diffusion.tiny import _WORDS, make_tiny, tiny_vocab

PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl"}


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_mtime_ns for f in [root, *root.rglob("*")]}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


def test_writes_safetensors_only(tiny_dir: Path) -> None:
    assert (tiny_dir / "model_index.json").is_file()
    files = [f for f in tiny_dir.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in PICKLE_SUFFIXES]
    for component in ("unet", "vae", "text_encoder"):
        assert list((tiny_dir / component).glob("*.safetensors")), component
    for component in ("tokenizer", "scheduler"):
        assert (tiny_dir / component).is_dir()
    size = sum(f.stat().st_size for f in files)
    assert size < 12 * 1024 * 1024, f"tiny model grew to {size / 1e6:.1f} MB"
    # nothing left behind by the atomic build
    assert not list(tiny_dir.parent.glob(".tiny.building-*"))


def test_same_seed_gives_identical_files(tiny_dir: Path, tmp_path: Path) -> None:
    again = make_tiny(tmp_path / "again", seed=0)
    assert _file_hashes(again) == _file_hashes(tiny_dir)
    other = _file_hashes(make_tiny(tmp_path / "other", seed=1))
    assert other["unet/diffusion_pytorch_model.safetensors"] != _file_hashes(tiny_dir)[
        "unet/diffusion_pytorch_model.safetensors"
    ]


def test_sd1_architecture(tiny_dir: Path) -> None:
    vae = json.loads((tiny_dir / "vae/config.json").read_text())
    unet = json.loads((tiny_dir / "unet/config.json").read_text())
    text = json.loads((tiny_dir / "text_encoder/config.json").read_text())
    sched = json.loads((tiny_dir / "scheduler/scheduler_config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # the pipeline's vae_scale_factor
    assert vae["latent_channels"] == unet["in_channels"] == 4
    assert unet["sample_size"] * 8 == 64
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert sched["_class_name"] == "PNDMScheduler"
    assert sched["beta_schedule"] == "scaled_linear"
    assert (sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"]) == (0.00085, 0.012, 1000)
    assert sched["skip_prk_steps"] is True and sched["set_alpha_to_one"] is False
    assert sched["steps_offset"] == 1


def test_tokenizer_matches_text_encoder(tiny_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    text = json.loads((tiny_dir / "text_encoder/config.json").read_text())
    assert tokenizer.model_max_length == 77
    assert text["vocab_size"] == len(tokenizer)
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # highest id, as in real CLIP
    for word in ("cat", "photo", "highly", "masterpiece"):
        assert len(tokenizer(word).input_ids) == 3, word  # bos, the word, eos
    ids = tokenizer("Zebra, 42!", padding="max_length", truncation=True).input_ids
    assert len(ids) == 77  # unknown words fall back to bytes and padding stays within 77


def test_vocab_words_are_single_tokens() -> None:
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    split = [w for w in _WORDS if len(tokenizer(w).input_ids) != 3]
    assert not split


def test_complete_folder_is_not_rebuilt(tiny_dir: Path) -> None:
    before = _mtimes(tiny_dir)
    assert make_tiny(tiny_dir, seed=0) == tiny_dir
    assert _mtimes(tiny_dir) == before


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: make_tiny(target), range(3)))
    assert results == [target] * 3
    assert (target / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny.lock"]


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "keep.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="model_index.json"):
        make_tiny(target)
    assert (target / "keep.txt").read_text() == "not a model"
