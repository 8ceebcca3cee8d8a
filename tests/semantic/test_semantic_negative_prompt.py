"""A negative prompt naming the foreground colour lowers that colour's share of the image."""

from evaluation import checks as S


def test_negative_prompt_lowers_colour_share(shapes_model):
    result = S.check_negative_prompt(shapes_model)
    print(result)
    assert result.passed, str(result)
