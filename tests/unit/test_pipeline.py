"""workers.diffusion.pipeline and workers.diffusion.schedulers on the tiny model (CPU only, offline)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farm.errors import ModelLoadError, RenderError
from farm.request.schedulers import SCHEDULERS
from farm.settings import BUILTIN_TINY
from workers.diffusion.pipeline import LoadedModel, check_model_folder, load_pipeline, resolve_location
from workers.diffusion.schedulers import make_scheduler


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def loaded(models_dir: Path) -> LoadedModel:
    return load_pipeline("tiny", BUILTIN_TINY, models_dir=models_dir, device="cpu")


@pytest.fixture
def tiny(loaded: LoadedModel) -> Iterator[LoadedModel]:
    """The shared model, with its original scheduler put back after each test."""
    original = loaded.pipe.scheduler
    yield loaded
    loaded.pipe.scheduler = original


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode. huggingface_hub reads HF_HUB_OFFLINE at import, so patch the constant too."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _render(model: LoadedModel, *, steps: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator("cpu").manual_seed(seed)
    return model.pipe(
        "a photo of a cat", height=64, width=64, num_inference_steps=steps, generator=generator
    ).images[0]


def _colours(image: Image.Image) -> int:
    return len(np.unique(np.asarray(image).reshape(-1, len(image.getbands())), axis=0))


def _copy_of_tiny(loaded: LoadedModel, dest: Path) -> Path:
    return Path(shutil.copytree(loaded.path, dest))


# -- loading ---------------------------------------------------------------------------------------


def test_builtin_tiny_loads_and_renders(tiny: LoadedModel, models_dir: Path) -> None:
    assert tiny.path == models_dir / "tiny"
    assert (tiny.name, tiny.device, tiny.dtype) == ("tiny", "cpu", torch.float32)
    assert tiny.pipe.vae_scale_factor == 8
    image = _render(tiny, steps=4)
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)
    assert _colours(image) > 1, "image is a single colour"


def test_attention_is_sdpa(tiny: LoadedModel) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for module in (tiny.pipe.unet, tiny.pipe.vae):
        assert all(isinstance(p, AttnProcessor2_0) for p in module.attn_processors.values())


def test_builtin_is_built_once(tiny: LoadedModel, models_dir: Path) -> None:
    stamp = (models_dir / "tiny/model_index.json").stat().st_mtime_ns
    assert resolve_location("tiny", BUILTIN_TINY, models_dir) == models_dir / "tiny"
    assert (models_dir / "tiny/model_index.json").stat().st_mtime_ns == stamp


def test_local_folder_loads_as_is(tiny: LoadedModel, tmp_path: Path) -> None:
    folder = _copy_of_tiny(tiny, tmp_path / "mine")
    model = load_pipeline("mine", str(folder), models_dir=tmp_path / "models", device="cpu")
    assert model.path == folder
    assert model.hash == tiny.hash
    assert not (tmp_path / "models").exists()  # nothing built or downloaded


def test_pickle_only_unet_is_refused_before_any_load(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy_of_tiny(tiny, tmp_path / "pickled")
    (folder / "unet/diffusion_pytorch_model.safetensors").unlink()
    # Junk, not a pickle: if anything tried to load it, it would fail differently (or not at all).
    (folder / "unet/diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("pickled", str(folder), models_dir=tmp_path / "models", device="cpu")
    message = str(info.value)
    assert "safetensors" in message and "pickle" in message
    assert "diffusion_pytorch_model.bin" in message


def test_component_without_weights_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    folder = _copy_of_tiny(tiny, tmp_path / "empty_vae")
    (folder / "vae/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"vae has no weights"):
        check_model_folder(folder)


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        check_model_folder(tmp_path)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither an existing local folder"):
        load_pipeline("gone", str(tmp_path / "nope"), models_dir=tmp_path, device="cpu")


def test_unknown_hub_id_offline_is_refused(tmp_path: Path, offline: None) -> None:
    with pytest.raises(ModelLoadError, match="neither a local folder nor reachable") as info:
        load_pipeline("hub", "farm-tests/no-such-model", models_dir=tmp_path, device="cpu")
    assert "farm-tests/no-such-model" in str(info.value)


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("/models/sd15.safetensors", "single-file checkpoint"),
        ("/models/sd15.ckpt", "never unpickles"),
        ("builtin:huge", "unknown built-in"),
        ("not a hub id!", "neither an existing local folder"),
    ],
)
def test_unloadable_locations(tmp_path: Path, location: str, words: str) -> None:
    with pytest.raises(ModelLoadError, match=words):
        resolve_location("m", location, tmp_path)


def test_model_hash_is_a1111_short_hash(tiny: LoadedModel, models_dir: Path) -> None:
    unet = tiny.path / "unet/diffusion_pytorch_model.safetensors"
    assert tiny.hash == hashlib.sha256(unet.read_bytes()).hexdigest()[:10]
    assert len(tiny.hash) == 10 and all(c in "0123456789abcdef" for c in tiny.hash)
    again = load_pipeline("tiny", BUILTIN_TINY, models_dir=models_dir, device="cpu")
    assert again.hash == tiny.hash


# -- schedulers and seeds ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_renders(tiny: LoadedModel, name: str) -> None:
    info = SCHEDULERS[name]
    tiny.pipe.scheduler = make_scheduler(name, tiny.scheduler_config)
    assert type(tiny.pipe.scheduler).__name__ == info.diffusers_class
    for key, value in info.options.items():
        assert tiny.pipe.scheduler.config[key] == value
    image = _render(tiny, steps=2)
    assert image.size == (64, 64)
    assert _colours(image) > 1


def test_swaps_start_from_the_original_config(tiny: LoadedModel) -> None:
    tiny.pipe.scheduler = make_scheduler("dpmpp_2m_karras", tiny.scheduler_config)
    plain = make_scheduler("dpmpp_2m", tiny.scheduler_config)
    assert plain.config.use_karras_sigmas is False
    assert tiny.scheduler_config["_class_name"] == "PNDMScheduler"
    assert tiny.scheduler_config["beta_schedule"] == "scaled_linear"


def test_unknown_scheduler_lists_valid_names(tiny: LoadedModel) -> None:
    with pytest.raises(RenderError, match="unknown scheduler 'nope'") as info:
        make_scheduler("nope", tiny.scheduler_config)
    assert all(name in str(info.value) for name in SCHEDULERS)


@pytest.mark.parametrize("name", ["pndm", "euler_a"])
def test_same_seed_same_pixels(tiny: LoadedModel, name: str) -> None:
    tiny.pipe.scheduler = make_scheduler(name, tiny.scheduler_config)
    first = np.asarray(_render(tiny, steps=3, seed=42))
    second = np.asarray(_render(tiny, steps=3, seed=42))
    other = np.asarray(_render(tiny, steps=3, seed=43))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)
