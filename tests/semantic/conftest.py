"""Semantic tests: the shipped shapes model (models/shapes) draws what its prompts say.

Every test renders a handful of 64 px images on the CPU through the farm's own loader and renderer
(``workers.diffusion.pipeline.load_pipeline`` + ``workers.diffusion.render.render_batch``); the model is loaded once per
session. The checks themselves live in ``evaluation.checks`` so the farm can reuse them.
"""

from __future__ import annotations

import pytest

from evaluation import checks as S


@pytest.fixture(scope="session")
def shapes_model():
    if not (S.DEFAULT_MODEL / "model_index.json").is_file():
        pytest.fail(f"the shipped model is missing: {S.DEFAULT_MODEL} (see docs/shapes-model.md)")
    return S.load(S.DEFAULT_MODEL, device="cpu")
