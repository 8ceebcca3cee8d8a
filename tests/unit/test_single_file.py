"""Single ``.safetensors`` checkpoints (LDM / A1111 layout): detection, offline conversion with a
sha256-keyed cache, the A1111 model hash, identical images to the same weights as a diffusers
folder, 9-channel inpainting files, refusals, and a ``;vae=`` override.

Fixtures are the tiny model exported with ``workers.diffusion.tiny.export_ldm`` (diffusers → LDM
keys by ``workers.diffusion.single_file.diffusers_to_ldm``); the mapping is also checked against
diffusers' own LDM → diffusers conversion on the full-size SD1.5 architecture (meta tensors).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from farm.catalogue import autov2_hash, inspect_checkpoint, locate
from farm.errors import ModelLoadError
from farm.imaging.pnginfo import a1111_parameters
from workers.diffusion import single_file
from workers.diffusion.pipeline import load_pipeline
from workers.diffusion.render import render_batch
from workers.diffusion.single_file import SD1_CONFIGS, diffusers_to_ldm, unet_to_ldm, vae_to_ldm
from workers.diffusion.tiny import export_ldm, make_tiny


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every connection or name lookup is recorded and refused (and the hub is in offline mode)."""
    import huggingface_hub.constants

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return attempts


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model (seed 0) as a folder and as LDM single files (fp32, fp16, with EMA), its
    9-channel variant, and another seed's VAE as a standalone LDM VAE file."""
    root = tmp_path_factory.mktemp("single")
    tiny = make_tiny(root / "tiny", seed=0)
    inpaint = make_tiny(root / "tiny-inpaint", seed=0, in_channels=9)
    other = make_tiny(root / "tiny-seed1", seed=1)
    from safetensors.torch import load_file

    vae_file = root / "other-vae.safetensors"
    vae_state = vae_to_ldm(load_file(str(other / "vae" / "diffusion_pytorch_model.safetensors")))
    save_file({k: v.contiguous() for k, v in vae_state.items()}, str(vae_file))
    return {
        "folder": tiny,
        "ldm": export_ldm(tiny, root / "tiny.safetensors"),
        "fp16": export_ldm(tiny, root / "tiny-fp16.safetensors", dtype=torch.float16),
        "ema": export_ldm(tiny, root / "tiny-ema.safetensors", ema=True),
        "inpaint_folder": inpaint,
        "inpaint": export_ldm(inpaint, root / "tiny-inpaint.safetensors"),
        "other_vae_folder": other,
        "vae": vae_file,
    }


def _image(model, make_spec) -> np.ndarray:
    spec = make_spec(prompt="a red circle on a blue background", seed=7, steps=3, model=model.name)
    result = render_batch(model, [spec], base_scheduler_config=model.scheduler_config)
    return np.asarray(result.images[0].image)


# -- the key mapping --------------------------------------------------------------------------------


def _meta_state(cls, config_dir: Path) -> dict:
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(config_dir))
    return model.state_dict()


def test_mapping_is_the_inverse_of_diffusers_conversion_on_sd15() -> None:
    """diffusers → LDM (ours) then LDM → diffusers (diffusers' own functions) gives every key back,
    with the shape it had, on the full-size SD1.5 UNet and VAE (meta tensors: no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for variant in ("v1", "v1-inpainting"):
        unet = _meta_state(UNet2DConditionModel, SD1_CONFIGS / variant / "unet")
        ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet, layers_per_block=2).items()}
        assert ldm["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == (9 if "inpainting" in variant else 4)
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # SD1's first upsampler
        assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # one after an attention
        assert "model.diffusion_model.input_blocks.3.0.op.weight" in ldm
        back = convert_ldm_unet_checkpoint(ldm, dict(UNet2DConditionModel.load_config(SD1_CONFIGS / variant / "unet")))
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.items()}
    vae = _meta_state(AutoencoderKL, SD1_CONFIGS / "v1" / "vae")
    ldm_vae = vae_to_ldm(vae)
    assert ldm_vae["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in ldm_vae and "encoder.down.0.downsample.conv.weight" in ldm_vae
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm_vae.items()},
                                      dict(AutoencoderKL.load_config(SD1_CONFIGS / "v1" / "vae")))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.items()}


def test_export_and_detection(files) -> None:
    info = inspect_checkpoint(files["ldm"])
    assert (info.layout, info.in_channels, info.variant, info.dtype, info.ema) == ("ldm", 4, "txt2img", "F32", False)
    assert (info.unet_width, info.context_dim, info.is_sd1_sized) == (32, 32, False)
    assert inspect_checkpoint(files["fp16"]).dtype == "F16"
    assert inspect_checkpoint(files["ema"]).ema is True
    inpaint = inspect_checkpoint(files["inpaint"])
    assert (inpaint.in_channels, inpaint.variant) == (9, "inpainting")
    assert inspect_checkpoint(files["vae"]).layout == "ldm-vae"
    assert inspect_checkpoint(files["folder"] / "unet" / "diffusion_pytorch_model.safetensors").layout == "diffusers-unet"
    assert inspect_checkpoint(files["folder"] / "vae" / "diffusion_pytorch_model.safetensors").layout == "diffusers-vae"
    keys = json.loads(files["ldm"].read_bytes()[8 : 8 + int.from_bytes(files["ldm"].read_bytes()[:8], "little")])
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in keys


def test_catalogue_locates_single_files_and_options(files, tmp_path: Path) -> None:
    found = locate("m", f"{files['ldm']};vae={files['vae']};config={files['folder']}", tmp_path)
    assert (found.kind, found.path, found.vae, found.config) == ("single_file", files["ldm"], files["vae"], files["folder"])
    assert locate("m", str(tmp_path / "gone.safetensors"), tmp_path).kind == "missing"
    assert locate("m", f"{files['folder']};vae={files['vae']}", tmp_path).kind == "folder"
    assert locate("m", f"{files['ldm']};colour=red", tmp_path).unknown_options == ("colour=red",)
    assert autov2_hash(files["ldm"]) == hashlib.sha256(files["ldm"].read_bytes()).hexdigest()[:10]


# -- loading and rendering --------------------------------------------------------------------------


def test_single_file_renders_like_the_folder_offline_and_cached(files, tmp_path: Path, make_spec, no_sockets, monkeypatch) -> None:
    location = f"{files['ldm']};config={files['folder']}"
    started = time.perf_counter()
    from_file = load_pipeline("sf", location, models_dir=tmp_path, device="cpu")
    cold = time.perf_counter() - started
    from_folder = load_pipeline("sf", str(files["folder"]), models_dir=tmp_path, device="cpu")
    assert np.array_equal(_image(from_file, make_spec), _image(from_folder, make_spec))
    assert from_file.hash == hashlib.sha256(files["ldm"].read_bytes()).hexdigest()[:10] != from_folder.hash
    assert from_file.path.parent == tmp_path / "single-file"
    assert from_file.path.name.startswith(hashlib.sha256(files["ldm"].read_bytes()).hexdigest())
    assert f"Model hash: {from_file.hash}, Model: sf" in a1111_parameters(
        make_spec(model="sf").params(), model_name="sf", model_hash=from_file.hash)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(single_file, "_convert", no_conversion)
    monkeypatch.setattr(single_file, "file_sha256", no_conversion)  # a restarted worker reads the hash from disk
    started = time.perf_counter()
    again = load_pipeline("sf", location, models_dir=tmp_path, device="cpu")
    cached = time.perf_counter() - started
    assert again.path == from_file.path and again.hash == from_file.hash and np.array_equal(_image(again, make_spec), _image(from_folder, make_spec))
    assert no_sockets == []
    print(f"single-file load: cold {cold:.2f} s, cached {cached:.2f} s")


def test_fp16_and_ema_files_load(files, tmp_path: Path, make_spec, no_sockets) -> None:
    reference = load_pipeline("sf", str(files["folder"]), models_dir=tmp_path, device="cpu")
    ema = load_pipeline("sf", f"{files['ema']};config={files['folder']}", models_dir=tmp_path, device="cpu")
    assert np.array_equal(_image(ema, make_spec), _image(reference, make_spec))  # main weights, EMA ignored
    half = load_pipeline("sf", f"{files['fp16']};config={files['folder']}", models_dir=tmp_path, device="cpu")
    assert half.pipe.unet.dtype == torch.float32  # cast to the device's dtype at load
    want = reference.pipe.unet.conv_in.weight.detach().half().float()
    assert torch.equal(half.pipe.unet.conv_in.weight.detach(), want)
    assert no_sockets == []


def test_nine_channel_file_loads_as_inpainting(files, tmp_path: Path, make_spec, no_sockets) -> None:
    from PIL import Image

    from workers.diffusion.render import Conditioning

    model = load_pipeline("inp", f"{files['inpaint']};config={files['inpaint_folder']}", models_dir=tmp_path, device="cpu")
    assert model.pipe.unet.config.in_channels == 9
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    spec = make_spec(model="inp", mode="inpaint", strength=1.0, steps=2, init_image_key="inputs/a.png", mask_key="inputs/b.png")
    result = render_batch(model, [spec], base_scheduler_config=model.scheduler_config,
                          conditions=[Conditioning(init=init, mask=mask)])
    assert result.images[0].image.size == (64, 64)
    assert no_sockets == []


def test_vae_override_changes_the_image(files, tmp_path: Path, make_spec, no_sockets) -> None:
    base = load_pipeline("sf", f"{files['ldm']};config={files['folder']}", models_dir=tmp_path, device="cpu")
    swapped = load_pipeline("sf", f"{files['ldm']};config={files['folder']};vae={files['vae']}", models_dir=tmp_path, device="cpu")
    from safetensors.torch import load_file

    other = load_file(str(files["other_vae_folder"] / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(swapped.pipe.vae.state_dict()[k], v) for k, v in other.items())
    assert not np.array_equal(_image(base, make_spec), _image(swapped, make_spec))
    folder_vae = load_pipeline("f", f"{files['folder']};vae={files['other_vae_folder']}", models_dir=tmp_path, device="cpu")
    assert np.array_equal(_image(folder_vae, make_spec), _image(swapped, make_spec))
    whole = export_ldm(files["other_vae_folder"], tmp_path / "other-whole.safetensors")  # its first_stage_model.*
    from_whole = load_pipeline("f", f"{files['folder']};vae={whole}", models_dir=tmp_path, device="cpu")
    assert all(torch.equal(from_whole.pipe.vae.state_dict()[k], v) for k, v in other.items())
    with pytest.raises(ModelLoadError, match="holds no VAE weights|does not fit"):
        load_pipeline("f", f"{files['folder']};vae={files['folder'] / 'unet' / 'diffusion_pytorch_model.safetensors'}",
                      models_dir=tmp_path, device="cpu")
    assert no_sockets == []


def test_concurrent_loads_convert_once(files, tmp_path: Path, monkeypatch) -> None:
    """Workers starting together: one converts under the lock, the others wait and reuse its folder."""
    import threading

    calls = []
    real = single_file._convert

    def counting(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # hold the lock a while
        return real(*args, **kwargs)

    monkeypatch.setattr(single_file, "_convert", counting)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(
            single_file.converted_folder("sf", files["ldm"], tmp_path, config=files["folder"])))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / ".complete").is_file()
    assert [p.name for p in (tmp_path / "single-file").iterdir() if p.name.startswith(".")] == []  # no leftovers


# -- refusals ---------------------------------------------------------------------------------------


def _write(path: Path, tensors: dict[str, list[int]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ({"conditioner.embedders.0.x": [1], "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]}, "SDXL"),
        ({"cond_stage_model.model.x": [1], "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]}, "2.x"),
        ({"conv_in.weight": [32, 4, 3, 3], "down_blocks.0.x": [1], "time_embedding.linear_1.weight": [1, 1]}, "one component"),
        ({"something.else": [1]}, "not a Stable Diffusion checkpoint"),
        ({"model.diffusion_model.input_blocks.0.0.weight": [320, 8, 3, 3]}, "8 input channels"),
        ({"model.diffusion_model.input_blocks.0.0.weight": [640, 4, 3, 3]}, "not SD1.x-sized"),
    ],
)
def test_files_that_are_not_sd1_checkpoints_are_refused(tmp_path: Path, tensors, words) -> None:
    path = _write(tmp_path / "m.safetensors", tensors)
    with pytest.raises(ModelLoadError, match=words):
        load_pipeline("m", str(path), models_dir=tmp_path, device="cpu")


def test_pickles_and_fakes_are_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_pipeline("m", str(ckpt), models_dir=tmp_path, device="cpu")
    fake = tmp_path / "renamed.safetensors"
    fake.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle renamed .safetensors
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        load_pipeline("m", str(fake), models_dir=tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="unknown location option"):
        load_pipeline("m", f"{fake};colour=red", models_dir=tmp_path, device="cpu")


# -- the full-size SD1.5 architecture (random weights) ----------------------------------------------


def _random_sd15_checkpoint(path: Path, variant: str) -> Path:
    """An SD1.5-architecture LDM checkpoint with random weights (fp16, ~2 GB), from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = SD1_CONFIGS / variant
    gen = torch.Generator().manual_seed(0)

    def randomised(model):
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
        return {k: v.to(torch.float16) for k, v in model.state_dict().items()}

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    state = diffusers_to_ldm(randomised(unet), randomised(vae), randomised(text), layers_per_block=2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.slow
def test_full_size_sd15_single_file_renders_one_step(tmp_path: Path, make_spec, no_sockets) -> None:
    """The SD1.5 architecture as one file, converted with the SHIPPED configs and the real tokenizer
    (no config= option), cached, and rendered for one step at 64×64."""
    path = _random_sd15_checkpoint(tmp_path / "sd15-random.safetensors", "v1")
    info = inspect_checkpoint(path)
    assert (info.layout, info.in_channels, info.dtype, info.is_sd1_sized) == ("ldm", 4, "F16", True)
    started = time.perf_counter()
    model = load_pipeline("sd15", str(path), models_dir=tmp_path, device="cpu")
    cold = time.perf_counter() - started
    assert model.pipe.unet.config.block_out_channels == [320, 640, 1280, 1280]
    assert model.pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    spec = make_spec(model="sd15", steps=1, width=64, height=64)
    result = render_batch(model, [spec], base_scheduler_config=model.scheduler_config)
    assert result.images[0].image.size == (64, 64)
    del model
    started = time.perf_counter()
    load_pipeline("sd15", str(path), models_dir=tmp_path, device="cpu")
    cached = time.perf_counter() - started
    assert no_sockets == []
    print(f"SD1.5-size single file ({path.stat().st_size / 1e9:.2f} GB fp16): cold {cold:.1f} s, cached {cached:.1f} s")


def test_shipped_sd1_config_folders(tmp_path: Path) -> None:
    """farm/data/sd1 holds SD1.5's published architecture; config_folder() completes it with the real
    tokenizer once (a second call reuses it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    for variant, channels in (("txt2img", 4), ("inpainting", 9)):
        folder = single_file.config_folder(variant, tmp_path)
        assert single_file.config_folder(variant, tmp_path) == folder
        unet = UNet2DConditionModel.load_config(folder / "unet")
        assert (unet["in_channels"], unet["cross_attention_dim"], unet["block_out_channels"]) == (channels, 768, [320, 640, 1280, 1280])
        assert AutoencoderKL.load_config(folder / "vae")["scaling_factor"] == 0.18215
        assert json.loads((folder / "text_encoder" / "config.json").read_text())["vocab_size"] == 49408
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tokenizer.pad_token_id == 49407 and tokenizer.model_max_length == 77
        assert (folder / "feature_extractor" / "preprocessor_config.json").is_file()
