"""The image analysis itself reads ground-truth drawings perfectly (so it can judge the model)."""

import random

from evaluation import checks as S


def test_analysis_reads_ground_truth_drawings():
    train, held = S.split()
    rng = random.Random(3)
    combos = [rng.choice(train + held) for _ in range(200)]
    got = [S.analyse(S.draw(S.random_scene(rng, c))) for c in combos]
    assert S.scores(combos, got) == {"colour_accuracy": 1.0, "background_accuracy": 1.0, "shape_accuracy": 1.0}


def test_held_out_split_is_compositional():
    train, held = S.split()
    assert len(held) == S.HELD_OUT_COUNT and not set(train) & set(held)
    for c, s, b in held:
        assert any(x[0] == c and x[1] == s for x in train)
        assert any(x[0] == c and x[2] == b for x in train)
        assert any(x[1] == s and x[2] == b for x in train)
    assert len({c for c, _, _ in held}) == len(S.COLOURS) and len({s for _, s, _ in held}) == len(S.SHAPES)
