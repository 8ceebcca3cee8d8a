"""img2img through the farm's render path (``render_batch``, mode ``img2img``; S.img2img).

Strength 0.2 keeps the input image; strength 0.9 follows a new prompt.
"""

from evaluation import checks as S


def test_img2img_strength(shapes_model):
    result = S.check_img2img(shapes_model)
    print(result)
    assert result.passed, str(result)
