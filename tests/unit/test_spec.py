"""check_request: every bound refuses bad input with a ValidationError naming field, value and limit;
good input (boundaries included) is expanded into one ImageSpec per image with recorded seeds."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from farm.errors import ValidationError
from farm.request.schedulers import SCHEDULER_NAMES
from farm.settings import Limits, Settings
from farm.request.spec import MAX_SEED, GenerationRequest, ImageSpec, check_request

DEFAULT = Limits()
REQUEST_FIELDS = [f.name for f in dataclasses.fields(GenerationRequest)]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, models={"tiny": "builtin:tiny", "sd15": "/models/sd15"})


def _request(**overrides: Any) -> dict[str, Any]:
    return {"prompt": "a red cube on a wooden table", **overrides}


# Each case: (request fields, expected .field, text that must appear in str(err) (the value),
#             substrings the limit must contain (what IS allowed)).
INVALID = [
    # -- width / height ----------------------------------------------------------------------
    pytest.param(_request(width=56), "width", "56", ["64", "2048"], id="width-below-min"),
    pytest.param(_request(width=2056), "width", "2056", ["64", "2048"], id="width-above-max"),
    pytest.param(_request(width=100), "width", "100", ["multiple of 8", "96", "104"], id="width-not-multiple-of-8"),
    pytest.param(_request(width=True), "width", "True", ["integer"], id="width-bool"),
    pytest.param(_request(width=512.0), "width", "512.0", ["integer"], id="width-float"),
    pytest.param(_request(width="512"), "width", "'512'", ["integer"], id="width-str"),
    pytest.param(_request(height=8), "height", "8", ["64", "2048"], id="height-below-min"),
    pytest.param(_request(height=4096), "height", "4096", ["64", "2048"], id="height-above-max"),
    pytest.param(_request(height=65), "height", "65", ["multiple of 8", "64", "72"], id="height-not-multiple-of-8"),
    pytest.param(_request(height=2047), "height", "2047", ["multiple of 8", "2040", "2048"], id="height-2047"),
    pytest.param(_request(height=False), "height", "False", ["integer"], id="height-bool"),
    pytest.param(_request(height=64.5), "height", "64.5", ["integer"], id="height-float"),
    pytest.param(_request(height="tall"), "height", "'tall'", ["integer"], id="height-str"),
    pytest.param(
        _request(width=2048, height=2048),
        "width×height",
        "2048×2048",
        [str(DEFAULT.max_pixels), "pixels"],
        id="too-many-pixels",
    ),
    pytest.param(
        _request(width=1536, height=1376),  # each side fine, 2_113_536 pixels > 2_097_152
        "width×height",
        "1536×1376",
        [str(DEFAULT.max_pixels)],
        id="too-many-pixels-just-over",
    ),
    # -- steps ---------------------------------------------------------------------------------
    pytest.param(_request(steps=0), "steps", "0", ["1", "150"], id="steps-zero"),
    pytest.param(_request(steps=151), "steps", "151", ["1", "150"], id="steps-above-max"),
    pytest.param(_request(steps=True), "steps", "True", ["integer"], id="steps-bool"),
    pytest.param(_request(steps=25.0), "steps", "25.0", ["integer"], id="steps-float"),
    # -- guidance_scale -----------------------------------------------------------------------
    pytest.param(_request(guidance_scale=-0.5), "guidance_scale", "-0.5", ["0.0", "30.0"], id="cfg-negative"),
    pytest.param(_request(guidance_scale=30.5), "guidance_scale", "30.5", ["0.0", "30.0"], id="cfg-above-max"),
    pytest.param(_request(guidance_scale=math.nan), "guidance_scale", "nan", ["finite"], id="cfg-nan"),
    pytest.param(_request(guidance_scale=math.inf), "guidance_scale", "inf", ["finite"], id="cfg-inf"),
    pytest.param(_request(guidance_scale=-math.inf), "guidance_scale", "-inf", ["finite"], id="cfg-minus-inf"),
    pytest.param(_request(guidance_scale="7.5"), "guidance_scale", "'7.5'", ["number"], id="cfg-str"),
    pytest.param(_request(guidance_scale=True), "guidance_scale", "True", ["number"], id="cfg-bool"),
    # -- num_images ---------------------------------------------------------------------------
    pytest.param(_request(num_images=0), "num_images", "0", ["1", "256"], id="num-images-zero"),
    pytest.param(_request(num_images=257), "num_images", "257", ["1", "256"], id="num-images-above-max"),
    pytest.param(_request(num_images=True), "num_images", "True", ["integer"], id="num-images-bool"),
    pytest.param(
        _request(num_images=3, seeds=[1, 2]), "num_images", "3", ["number of seeds", "2"], id="num-images-vs-seeds"
    ),
    pytest.param(
        _request(seeds=list(range(257))), "num_images", "257", ["256"], id="too-many-seeds"
    ),
    # -- seed ----------------------------------------------------------------------------------
    pytest.param(_request(seed=-1), "seed", "-1", ["0", str(MAX_SEED)], id="seed-negative"),
    pytest.param(_request(seed=MAX_SEED + 1), "seed", str(MAX_SEED + 1), [str(MAX_SEED)], id="seed-above-max"),
    pytest.param(
        # the last image would get MAX_SEED + 1: the first seed's limit shrinks by num_images - 1
        _request(seed=MAX_SEED, num_images=2), "seed", str(MAX_SEED), [str(MAX_SEED - 1)], id="seed-overflow-1"
    ),
    pytest.param(
        _request(seed=MAX_SEED - 8, num_images=10), "seed", str(MAX_SEED - 8), [str(MAX_SEED - 9)],
        id="seed-overflow-10",
    ),
    pytest.param(_request(seed=True), "seed", "True", ["integer"], id="seed-bool"),
    pytest.param(_request(seed="42"), "seed", "'42'", ["integer"], id="seed-str"),
    # -- seeds ---------------------------------------------------------------------------------
    pytest.param(_request(seeds=[]), "seeds", "[]", ["non-empty list"], id="seeds-empty"),
    pytest.param(_request(seeds="1,2,3"), "seeds", "'1,2,3'", ["list"], id="seeds-str"),
    pytest.param(_request(seeds=7), "seeds", "7", ["list"], id="seeds-int"),
    pytest.param(_request(seeds=[1, -1]), "seeds[1]", "-1", ["0", str(MAX_SEED)], id="seeds-element-negative"),
    pytest.param(
        _request(seeds=[MAX_SEED + 1]), "seeds[0]", str(MAX_SEED + 1), [str(MAX_SEED)], id="seeds-element-too-big"
    ),
    pytest.param(_request(seeds=[1, "2"]), "seeds[1]", "'2'", ["integer"], id="seeds-element-str"),
    pytest.param(_request(seeds=[1, True]), "seeds[1]", "True", ["integer"], id="seeds-element-bool"),
    pytest.param(_request(seed=1, seeds=[1, 2]), "seed", "1", ["either seed or seeds"], id="seed-and-seeds"),
    # -- scheduler / model ---------------------------------------------------------------------
    pytest.param(
        _request(scheduler="nope"), "scheduler", "'nope'", ["unknown scheduler", *SCHEDULER_NAMES], id="scheduler"
    ),
    pytest.param(
        _request(scheduler="DPM++ 2M"), "scheduler", "'DPM++ 2M'", list(SCHEDULER_NAMES), id="scheduler-a1111-name"
    ),
    pytest.param(_request(model="sd99"), "model", "'sd99'", ["unknown model", "sd15", "tiny"], id="model"),
    # -- prompt / negative_prompt --------------------------------------------------------------
    pytest.param(_request(prompt=5), "prompt", "5", ["string"], id="prompt-int"),
    pytest.param(_request(prompt=None), "prompt", "None", ["string"], id="prompt-none"),
    pytest.param(_request(prompt=["a", "b"]), "prompt", "['a', 'b']", ["string"], id="prompt-list"),
    pytest.param(
        _request(prompt="a" * 4001), "prompt", "a" * 40, ["4001", "4000"], id="prompt-too-long"
    ),
    pytest.param(_request(prompt="a red\x00cube"), "prompt", "a red\\x00cube", ["NUL"], id="prompt-nul"),
    pytest.param(_request(negative_prompt=3), "negative_prompt", "3", ["string"], id="negative-int"),
    pytest.param(
        _request(negative_prompt="b" * 4001), "negative_prompt", "b" * 40, ["4001", "4000"], id="negative-too-long"
    ),
    pytest.param(_request(negative_prompt="\x00"), "negative_prompt", "\\x00", ["NUL"], id="negative-nul"),
    # -- shape of the request ------------------------------------------------------------------
    pytest.param(
        _request(sampler="euler"), "sampler", "'euler'", ["unknown field", *REQUEST_FIELDS], id="unknown-field"
    ),
    pytest.param(
        _request(cfg_scale=7, sampler="euler"), "cfg_scale", "7", ["unknown field", *REQUEST_FIELDS],
        id="unknown-fields-first-alphabetically",
    ),
    pytest.param({"width": 512}, "prompt", "None", ["required"], id="missing-prompt"),
    pytest.param({}, "prompt", "None", ["required"], id="empty-request"),
    pytest.param("a red cube", "request", "'a red cube'", ["object"], id="not-an-object"),
    pytest.param(["a red cube"], "request", "['a red cube']", ["object"], id="list-not-an-object"),
]


@pytest.mark.parametrize(("request_fields", "field", "value_text", "limit_parts"), INVALID)
def test_invalid_request_is_refused(
    settings: Settings, request_fields: Any, field: str, value_text: str, limit_parts: list[str]
) -> None:
    with pytest.raises(ValidationError) as caught:
        check_request(request_fields, settings)
    err = caught.value
    message = str(err)
    assert err.field == field, message
    assert message.startswith(f"{field}="), message
    assert value_text in message
    assert isinstance(err.limit, str) and err.limit
    for part in limit_parts:
        assert part in err.limit, f"{part!r} missing from limit {err.limit!r}"
    assert err.limit in message
    assert "\n" not in message, "a CLI error must stay on one line"


@pytest.mark.parametrize(
    "model",
    [pytest.param(["sd15"], id="list"), pytest.param({"name": "sd15"}, id="dict")],
)
def test_unhashable_model_is_a_validation_error(settings: Settings, model: Any) -> None:
    """A JSON list/object as model is refused like any unknown model (it once raised TypeError)."""
    with pytest.raises(ValidationError) as caught:
        check_request(_request(model=model), settings)
    assert caught.value.field == "model"
    assert "unknown model" in caught.value.limit and "tiny" in caught.value.limit


def test_error_names_the_request_index(settings: Settings) -> None:
    with pytest.raises(ValidationError) as caught:
        check_request(_request(steps=0), settings, index=3)
    assert caught.value.index == 3
    assert str(caught.value).startswith("request 3: steps=0 is invalid")


def test_generation_request_objects_are_checked_too(settings: Settings) -> None:
    with pytest.raises(ValidationError) as caught:
        check_request(GenerationRequest(prompt="x", width=100), settings)
    assert caught.value.field == "width"
    assert caught.value.value == 100


def test_value_attribute_is_what_was_given(settings: Settings) -> None:
    with pytest.raises(ValidationError) as caught:
        check_request(_request(guidance_scale=31), settings)
    assert caught.value.value == 31
    assert caught.value.field == "guidance_scale"


# -- valid requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"width": 64, "height": 64}, id="min-size"),
        pytest.param({"width": 2048, "height": 1024}, id="max-size-at-max-pixels"),
        pytest.param({"width": 1024, "height": 2048}, id="max-height-at-max-pixels"),
        pytest.param({"steps": 1}, id="min-steps"),
        pytest.param({"steps": 150}, id="max-steps"),
        pytest.param({"guidance_scale": 0}, id="min-cfg"),
        pytest.param({"guidance_scale": 30.0}, id="max-cfg"),
        pytest.param({"num_images": 1}, id="one-image"),
        pytest.param({"num_images": 256}, id="max-images"),
        pytest.param({"seed": 0}, id="seed-zero"),
        pytest.param({"seed": MAX_SEED}, id="seed-max"),
        pytest.param({"seed": MAX_SEED - 255, "num_images": 256}, id="seed-max-last-image"),
        pytest.param({"seeds": [0, MAX_SEED]}, id="seeds-extremes"),
        pytest.param({"seeds": list(range(256))}, id="max-seeds"),
        pytest.param({"seeds": [3, 4], "num_images": 2}, id="seeds-with-matching-count"),
        pytest.param({"prompt": "p" * 4000, "negative_prompt": "n" * 4000}, id="prompt-max-chars"),
        pytest.param({"scheduler": "unipc", "model": "sd15"}, id="named-scheduler-and-model"),
    ],
)
def test_boundary_values_are_accepted(settings: Settings, fields: dict[str, Any]) -> None:
    checked = check_request(_request(**fields), settings)
    expected_count = len(fields["seeds"]) if "seeds" in fields else fields.get("num_images", 1)
    assert len(checked.images) == expected_count
    for image in checked.images:
        assert isinstance(image, ImageSpec)
        assert 0 <= image.seed <= MAX_SEED
        for name, value in fields.items():
            if name not in ("seed", "seeds", "num_images"):
                assert getattr(image, name) == value
    if "seed" in fields:
        assert checked.images[-1].seed == fields["seed"] + expected_count - 1


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_name_is_accepted(settings: Settings, scheduler: str) -> None:
    assert check_request(_request(scheduler=scheduler), settings).images[0].scheduler == scheduler


def test_missing_seed_is_drawn_once_and_consecutive(settings: Settings) -> None:
    images = check_request(_request(num_images=5), settings).images
    seeds = [image.seed for image in images]
    assert seeds == list(range(seeds[0], seeds[0] + 5))
    assert 0 <= seeds[0] and seeds[-1] <= MAX_SEED
    # a fresh draw per submission (two equal draws: 1 in 4 billion)
    assert check_request(_request(num_images=5), settings).images[0].seed != seeds[0]


@pytest.mark.parametrize("draw", ["lowest", "highest"])
def test_drawn_seeds_stay_in_range(settings: Settings, monkeypatch: pytest.MonkeyPatch, draw: str) -> None:
    """Whatever is drawn, every image's seed is a valid 32-bit seed (A1111 can replay it)."""
    import farm.request.spec

    monkeypatch.setattr(farm.request.spec.secrets, "randbelow", lambda n: 0 if draw == "lowest" else n - 1)
    seeds = [image.seed for image in check_request(_request(num_images=256), settings).images]
    assert len(seeds) == 256
    if draw == "lowest":
        assert seeds[0] == 0
    else:
        assert seeds[-1] == MAX_SEED


def test_explicit_seed_gives_consecutive_seeds(settings: Settings) -> None:
    images = check_request(_request(seed=1000, num_images=3), settings).images
    assert [image.seed for image in images] == [1000, 1001, 1002]


def test_explicit_seeds_are_kept_in_order(settings: Settings) -> None:
    images = check_request(_request(seeds=[9, 3, 3, 0, 7]), settings).images
    assert [image.seed for image in images] == [9, 3, 3, 0, 7]


def test_defaults_come_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        models={"tiny": "builtin:tiny", "sd15": "/models/sd15"},
        default_model="sd15",
        default_scheduler="euler_a",
    )
    image = check_request({"prompt": "x"}, settings).images[0]
    assert image.scheduler == "euler_a"
    assert image.model == "sd15"
    assert (image.width, image.height, image.steps, image.guidance_scale) == (512, 512, 25, 7.5)
    assert image.negative_prompt == ""


def test_stock_defaults(settings: Settings) -> None:
    image = check_request({"prompt": "x"}, settings).images[0]
    assert image.scheduler == settings.default_scheduler == "dpmpp_2m"
    assert image.model == settings.default_model == "tiny"


def test_resolved_spec_carries_every_parameter(settings: Settings) -> None:
    checked = check_request(
        _request(negative_prompt="blurry", seed=5, steps=30, guidance_scale=7, width=640, height=384),
        settings,
        index=2,
    )
    (image,) = checked.images
    params = image.params()
    assert params.pop("safety") == "off"  # FARM_SAFETY's default (tests/unit/test_safety.py)
    assert params.pop("embeddings") == ()  # none registered (tests/unit/test_embeddings.py)
    assert params == {
        "prompt": "a red cube on a wooden table",
        "negative_prompt": "blurry",
        "seed": 5,
        "steps": 30,
        "guidance_scale": 7.0,
        "width": 640,
        "height": 384,
        "scheduler": "dpmpp_2m",
        "model": "tiny",
        "request_index": 2,
        "mode": "txt2img",
        "init_image_key": None,
        "mask_key": None,
        "strength": None,
        "resize_mode": "resize",
        "mask_blur": 0,
        "paste_back": False,
        "clip_skip": 1,
        "loras": (),
    }
    assert isinstance(image.guidance_scale, float)


def test_custom_limits_are_honoured(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, limits=Limits(max_steps=10, max_num_images=4, min_size=128))
    assert len(check_request(_request(steps=10, num_images=4, width=128, height=128), settings).images) == 4
    for fields, field, limit_part in [
        ({"steps": 11}, "steps", "between 1 and 10"),
        ({"num_images": 5}, "num_images", "between 1 and 4"),
        ({"width": 120}, "width", "between 128 and 2048"),
    ]:
        with pytest.raises(ValidationError) as caught:
            check_request(_request(**{"steps": 5, "width": 128, "height": 128, **fields}), settings)
        assert caught.value.field == field
        assert limit_part in caught.value.limit


def test_the_parsed_form_of_weighted_prompts_is_recorded(settings: Settings) -> None:
    (image,) = check_request(_request(prompt="a (red:1.3) cube", negative_prompt="[blurry]"), settings).images
    recorded = image.recorded()
    assert recorded["prompt_parsed"] == [
        {"text": "a ", "weight": 1.0}, {"text": "red", "weight": 1.3}, {"text": " cube", "weight": 1.0}
    ]
    assert recorded["negative_prompt_parsed"][0]["text"] == "blurry"
    (plain,) = check_request(_request(prompt="a red cube"), settings).images
    assert "prompt_parsed" not in plain.recorded()
    assert ImageSpec.from_params(recorded) == image  # the worker reads the spec back, extras ignored


# -- the fast construction keeps what the dataclass would give ------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"seed": 7}, id="one-seed"),
        pytest.param({"seed": 7, "num_images": 3}, id="seed-and-count"),
        pytest.param({"seeds": [5, 1, 5]}, id="seeds"),
        pytest.param({"num_images": 2, "steps": 9, "guidance_scale": 3, "width": 64, "height": 128}, id="drawn-seeds"),
    ],
)
def test_specs_are_what_the_dataclass_would_build(settings: Settings, fields: dict[str, Any]) -> None:
    checked = check_request(_request(**fields), settings)
    for image in checked.images:
        rebuilt = ImageSpec(**dataclasses.asdict(image))
        assert image == rebuilt and hash(image) == hash(rebuilt)
        assert list(image.params()) == [f.name for f in dataclasses.fields(ImageSpec)]
        assert image.params() == dataclasses.asdict(image)
        with pytest.raises(dataclasses.FrozenInstanceError):
            image.seed = 1  # type: ignore[misc]
    # the checked request carries every default filled in, the caller's own object untouched
    given = GenerationRequest(prompt="x", **fields)
    filled = check_request(given, settings).request
    assert (filled.steps, filled.scheduler) == (fields.get("steps", 25), "dpmpp_2m") and given.steps == fields.get("steps")
    assert isinstance(filled.guidance_scale, float) and filled.width == fields.get("width", 512)
