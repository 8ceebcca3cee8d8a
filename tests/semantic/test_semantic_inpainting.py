"""Inpainting through the farm's render path (``render_batch``, mode ``inpaint``; S.inpaint).

The shapes model has a 4-channel UNet, so ``render_batch``'s inpainting pipeline works by latent
blending (the outside of the mask is the input's latent, noised to each step); nothing is pasted
back, so what is kept outside is what the VAE reconstructs, and the inside is generated.
"""

from evaluation import checks as S


def test_inpainting_keeps_outside_and_follows_prompt_inside(shapes_model):
    result = S.check_inpainting(shapes_model)
    print(result)
    assert result.passed, str(result)
