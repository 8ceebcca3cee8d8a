"""plan_batches: images that can share a GPU batch are grouped, in order, in batches of bounded size.

Images come from the shared spec builder (``make_spec``: tiny, 64 px, 4 steps, with overrides).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from farm.request.spec import ImageSpec
from farm.dispatch.publish import plan_batches


def _pairs(specs: list[ImageSpec]) -> list[tuple[str, ImageSpec]]:
    return [(f"img-{i:04d}", spec) for i, spec in enumerate(specs)]


def test_same_batch_key_is_one_batch(make_spec) -> None:
    # prompt, negative prompt and seed differ per image and still share a GPU batch
    specs = [make_spec(seed=i, prompt=f"prompt {i}", negative_prompt=f"neg {i}") for i in range(5)]
    pairs = _pairs(specs)
    (batch,) = plan_batches(pairs, max_batch_size=8)
    assert batch.image_ids == tuple(image_id for image_id, _ in pairs)
    assert batch.model == "tiny"


@pytest.mark.parametrize(
    ("count", "max_batch_size", "sizes"),
    [
        (20, 8, [8, 8, 4]),
        (16, 8, [8, 8]),
        (8, 8, [8]),
        (9, 8, [8, 1]),
        (3, 1, [1, 1, 1]),
        (1, 256, [1]),
    ],
)
def test_chunks_never_exceed_max_batch_size(make_spec, count: int, max_batch_size: int, sizes: list[int]) -> None:
    pairs = _pairs([make_spec(seed=i) for i in range(count)])
    batches = plan_batches(pairs, max_batch_size)
    assert [len(batch.image_ids) for batch in batches] == sizes
    # chunks are consecutive runs of the submission order
    assert [image_id for batch in batches for image_id in batch.image_ids] == [image_id for image_id, _ in pairs]


@pytest.mark.parametrize(
    "difference",
    [
        pytest.param({"guidance_scale": 8.0}, id="guidance"),
        pytest.param({"width": 640}, id="width"),
        pytest.param({"height": 768}, id="height"),
        pytest.param({"width": 768, "height": 512}, id="transposed-size"),
        pytest.param({"steps": 30}, id="steps"),
        pytest.param({"scheduler": "euler_a"}, id="scheduler"),
        pytest.param({"model": "sd15"}, id="model"),
    ],
)
def test_different_batch_key_never_shares_a_batch(make_spec, difference: dict[str, Any]) -> None:
    base = make_spec(width=512, height=768) if difference == {"width": 768, "height": 512} else make_spec()
    pairs = _pairs([base, make_spec(**{**base.params(), **difference, "seed": 2}), base])
    batches = plan_batches(pairs, max_batch_size=8)
    assert len(batches) == 2
    by_id = dict(pairs)
    for batch in batches:
        keys = {by_id[image_id].batch_key for image_id in batch.image_ids}
        assert len(keys) == 1, f"batch {batch.image_ids} mixes {keys}"
        assert batch.model == by_id[batch.image_ids[0]].model
    assert sorted(batch.image_ids for batch in batches) == [("img-0000", "img-0002"), ("img-0001",)]


def test_submission_order_is_kept_within_a_batch(make_spec) -> None:
    a, b = make_spec(), make_spec(steps=10)
    pairs = _pairs([a, b, a, b, b, a, a])
    batches = plan_batches(pairs, max_batch_size=8)
    assert [batch.image_ids for batch in batches] == [
        ("img-0000", "img-0002", "img-0005", "img-0006"),
        ("img-0001", "img-0003", "img-0004"),
    ]


def test_batch_label_describes_the_work(make_spec) -> None:
    spec = make_spec(prompt="a red cube", width=640, height=384, steps=30, scheduler="ddim", guidance_scale=5.0)
    (batch,) = plan_batches(_pairs([spec] * 3), 8)
    assert batch.label == "'a red cube' · 3× 640x384, 30 steps, ddim, cfg 5.0"


def test_batch_label_shortens_a_long_prompt_to_one_line(make_spec) -> None:
    spec = make_spec(prompt="a very\nlong   prompt " + "with many words " * 10)
    (batch,) = plan_batches(_pairs([spec]), 8)
    excerpt = batch.label.split(" · ")[0]
    assert excerpt.startswith("'a very long prompt with") and excerpt.endswith("…'") and len(excerpt) <= 50


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
def test_every_image_in_exactly_one_batch(make_spec, seed: int, max_batch_size: int) -> None:
    rng = random.Random(seed)
    specs = [
        make_spec(
            seed=i,
            model=rng.choice(["tiny", "sd15"]),
            width=rng.choice([512, 768]),
            steps=rng.choice([20, 25]),
            scheduler=rng.choice(["ddim", "euler"]),
            guidance_scale=rng.choice([5.0, 7.5]),
        )
        for i in range(rng.randint(1, 120))
    ]
    pairs = _pairs(specs)
    batches = plan_batches(pairs, max_batch_size)

    placed = Counter(image_id for batch in batches for image_id in batch.image_ids)
    assert set(placed) == {image_id for image_id, _ in pairs}
    assert set(placed.values()) == {1}
    assert len({batch.task_id for batch in batches}) == len(batches), "task ids must be unique"

    by_id = dict(pairs)
    position = {image_id: i for i, (image_id, _) in enumerate(pairs)}
    for batch in batches:
        assert 1 <= len(batch.image_ids) <= max_batch_size
        assert len({by_id[image_id].batch_key for image_id in batch.image_ids}) == 1
        assert batch.model == by_id[batch.image_ids[0]].model
        assert [position[i] for i in batch.image_ids] == sorted(position[i] for i in batch.image_ids)
    # only the last chunk of a key may be partial: no more batches than needed
    per_key = Counter(spec.batch_key for spec in specs)
    assert len(batches) == sum(-(-n // max_batch_size) for n in per_key.values())


def test_no_images_no_batches() -> None:
    assert plan_batches([], 8) == []
