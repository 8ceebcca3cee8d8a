"""img2img and inpainting through the worker's render path, on tiny 4- and 9-channel models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from farm.errors import RenderError
from farm.request.spec import ImageSpec
from workers.diffusion.pipeline import load_pipeline
from workers.diffusion.render import Conditioning, render_batch
from workers.diffusion.tiny import make_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    plain = load_pipeline("tiny", str(make_tiny(root / "tiny", seed=0)), models_dir=root, device="cpu")
    inpaint = load_pipeline("tiny9", str(make_tiny(root / "tiny9", seed=0, in_channels=9)), models_dir=root, device="cpu")
    return plain, inpaint


def spec(mode: str, **kw) -> ImageSpec:
    base = dict(prompt="a red circle on a blue background", negative_prompt="", seed=3, steps=10, guidance_scale=7.5,
                width=64, height=64, scheduler="euler", model="tiny", mode=mode)
    base.update(kw)
    return ImageSpec(**base)


def init_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    return image


def mask_image() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)  # repaint the left half
    return mask


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def render(model, one: ImageSpec, condition: Conditioning) -> Image.Image:
    return render_batch(model, [one], base_scheduler_config=model.scheduler_config, conditions=[condition]).images[0].image


def test_img2img_strength_zero_is_the_vae_round_trip(models):
    plain, _ = models
    init = init_image()
    out = array(render(plain, spec("img2img", strength=0.0), Conditioning(init=init)))
    from workers.diffusion.render import _round_trip

    assert np.abs(out - array(_round_trip(plain, [init])[0])).max() <= 1
    moved = array(render(plain, spec("img2img", strength=0.5), Conditioning(init=init)))
    assert np.abs(moved - out).mean() > 1  # a real strength denoises


@pytest.mark.parametrize("which", ["4-channel", "9-channel"])
def test_inpainting_with_paste_back_keeps_pixels_outside_the_mask_exactly(models, which):
    model = models[0] if which == "4-channel" else models[1]
    init, mask = init_image(), mask_image()
    keep = np.asarray(mask) == 0
    pasted = array(render(model, spec("inpaint", strength=1.0, paste_back=True), Conditioning(init=init, mask=mask)))
    assert np.array_equal(pasted[keep], array(init)[keep])
    assert not np.array_equal(pasted[~keep], array(init)[~keep])  # the masked half was repainted


def test_four_channel_inpainting_blends_latents_so_the_kept_part_is_the_vae_reconstruction(models):
    """Without paste-back a 4-channel model keeps the unmasked latents: away from the mask edge the
    output is the VAE's reconstruction of the original (for a random VAE, not the original itself)."""
    plain, _ = models
    init, mask = init_image(), mask_image()
    from workers.diffusion.render import _round_trip

    out = array(render(plain, spec("inpaint", strength=1.0), Conditioning(init=init, mask=mask)))
    reference = array(_round_trip(plain, [init])[0])
    far_kept = np.s_[:, 48:]  # well inside the kept half, beyond the VAE's reach across the edge
    repainted = np.s_[:, :16]
    assert np.abs(out[far_kept] - reference[far_kept]).mean() < 0.5 * np.abs(out[repainted] - reference[repainted]).mean()


def test_mask_blur_softens_the_edge_of_what_is_kept(models):
    plain, _ = models
    init, mask = init_image(), mask_image()
    sharp = array(render(plain, spec("inpaint", strength=1.0, paste_back=True), Conditioning(init=init, mask=mask)))
    soft = array(render(plain, spec("inpaint", strength=1.0, paste_back=True, mask_blur=6), Conditioning(init=init, mask=mask)))
    # just right of the mask edge: kept exactly when sharp, blended when blurred
    assert np.array_equal(sharp[:, 33:36], array(init)[:, 33:36])
    assert not np.array_equal(soft[:, 33:36], array(init)[:, 33:36])


def test_inpainting_model_refuses_txt2img_and_batches_keep_their_own_seeds(models):
    plain, inpaint = models
    with pytest.raises(RenderError, match="9-channel"):
        render(inpaint, spec("txt2img"), Conditioning())
    init = init_image()
    specs = [spec("img2img", strength=0.6, seed=s) for s in (1, 2)]
    batch = render_batch(plain, specs, base_scheduler_config=plain.scheduler_config,
                         conditions=[Conditioning(init=init), Conditioning(init=init)]).images
    alone = render(plain, specs[1], Conditioning(init=init))
    assert np.abs(array(batch[1].image) - array(alone)).max() <= 1
    assert not np.array_equal(array(batch[0].image), array(batch[1].image))
