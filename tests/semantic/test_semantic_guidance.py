"""Classifier-free guidance works: without it (1.0) images follow their captions clearly less."""

from evaluation import checks as S


def test_guidance_default_beats_no_guidance(shapes_model):
    result = S.check_guidance(shapes_model)
    print(result)
    assert result.passed, str(result)
