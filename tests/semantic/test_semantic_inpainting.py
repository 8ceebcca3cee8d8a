"""Inpainting with the 4-channel model by latent blending (S.inpaint).

diffusers' StableDiffusionInpaintPipeline needs a 9-channel inpainting UNet, which this model is
not; the latent-blend loop keeps the outside of the mask and generates the inside.
"""

from evaluation import checks as S


def test_inpainting_keeps_outside_and_follows_prompt_inside(shapes_model):
    result = S.check_inpainting(shapes_model)
    print(result)
    assert result.passed, str(result)
