"""Farm PNGs carry A1111-style metadata that a third-party reader (sd-parsers) understands."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image
from sd_parsers import ParserManager

from farm.imaging.pnginfo import a1111_extra, a1111_parameters, encode_png, read_png_metadata
from farm.request.spec import ImageSpec
from farm.request.schedulers import SCHEDULERS


#: The image every test describes, unless it overrides a field (any ImageSpec field).
PNG_SPEC: dict[str, Any] = {
    "prompt": "a red cube on a wooden table, studio light",
    "negative_prompt": "blurry, low quality",
    "steps": 25,
    "scheduler": "dpmpp_2m",
    "guidance_scale": 7.5,
    "seed": 123456789,
    "width": 512,
    "height": 768,
}


@pytest.fixture
def spec_params(make_spec) -> Callable[..., dict[str, Any]]:
    """``spec_params(**overrides)``: one image's recorded params (the shared ``make_spec`` with ``PNG_SPEC``)."""

    def params(**overrides: Any) -> dict[str, Any]:
        return make_spec(**{**PNG_SPEC, **overrides}).params()

    return params


def _png(params: dict[str, Any], spec: dict[str, Any] | None = None, **kwargs: Any) -> bytes:
    text = a1111_parameters(params, model_name="tiny", model_hash="abcdef1234", **kwargs)
    return encode_png(Image.new("RGB", (16, 16), (200, 30, 30)), parameters=text, spec=spec or params)


def _parse(data: bytes, tmp_path: Path):
    path = tmp_path / "image.png"
    path.write_bytes(data)
    info = ParserManager().parse(path)
    assert info is not None, "sd-parsers found no metadata"
    assert info.generator.name == "AUTOMATIC1111"
    assert len(info.samplers) == 1
    return info, info.samplers[0]


def test_exact_infotext_format(spec_params) -> None:
    text = a1111_parameters(
        spec_params(scheduler="dpmpp_2m_karras"),
        model_name="tiny",
        model_hash="abcdef1234",
        extra={"Denoising strength": "0.75", "Clip skip": "2"},
    )
    assert text == (
        "a red cube on a wooden table, studio light\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 123456789, "
        "Size: 512x768, Model hash: abcdef1234, Model: tiny, Denoising strength: 0.75, Clip skip: 2"
    )


def test_empty_negative_prompt_and_missing_hash_are_omitted(spec_params) -> None:
    text = a1111_parameters(spec_params(negative_prompt="", guidance_scale=7.0), model_name="tiny", model_hash=None)
    assert text == (
        "a red cube on a wooden table, studio light\n"
        "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7, Seed: 123456789, Size: 512x768, Model: tiny"
    )


def test_values_with_commas_are_quoted_like_a1111(spec_params) -> None:
    text = a1111_parameters(spec_params(), model_name="my, model", model_hash=None, extra={"Note": "a: b"})
    assert text.endswith('Model: "my, model", Note: "a: b"')


@pytest.mark.parametrize(
    ("scheduler", "sampler_name", "schedule_type"),
    [
        ("dpmpp_2m", "DPM++ 2M", None),
        ("dpmpp_2m_karras", "DPM++ 2M", "Karras"),
        ("euler_a", "Euler a", None),
        ("euler", "Euler", None),
        ("ddim", "DDIM", None),
        ("pndm", "PLMS", None),
        ("heun", "Heun", None),
        ("lms", "LMS", None),
        ("unipc", "UniPC", None),
    ],
)
def test_sd_parsers_reads_farm_png(
    spec_params, tmp_path: Path, scheduler: str, sampler_name: str, schedule_type: str | None
) -> None:
    params = spec_params(scheduler=scheduler)
    info, sampler = _parse(_png(params), tmp_path)

    assert [p.value for p in sampler.prompts] == [params["prompt"]]
    assert [p.value for p in sampler.negative_prompts] == [params["negative_prompt"]]
    assert sampler.name == sampler_name
    assert sampler.parameters["seed"] == str(params["seed"])
    assert sampler.parameters["steps"] == "25"
    assert sampler.parameters["cfg_scale"] == "7.5"
    assert sampler.parameters.get("scheduler") == schedule_type
    assert sampler.model is not None
    assert (sampler.model.name, sampler.model.hash) == ("tiny", "abcdef1234")
    assert info.metadata["Size"] == "512x768"


def test_every_farm_scheduler_has_an_infotext(spec_params) -> None:
    for name in SCHEDULERS:
        assert "Sampler: " in a1111_parameters(spec_params(scheduler=name), model_name="tiny", model_hash=None)


def test_unknown_scheduler_is_refused(spec_params) -> None:
    with pytest.raises(ValueError, match="no A1111 name"):
        a1111_parameters(spec_params(scheduler="nope"), model_name="tiny", model_hash=None)


@pytest.mark.parametrize("key", ["", "Seed", "Model", "a,b", "a: b", "x\ny"])
def test_bad_extra_keys_are_refused(spec_params, key: str) -> None:
    with pytest.raises(ValueError, match="extra infotext key"):
        a1111_parameters(spec_params(), model_name="tiny", model_hash=None, extra={key: "1"})


def test_unicode_prompt_survives(spec_params, tmp_path: Path) -> None:
    params = spec_params(
        prompt="一只红色的猫, ünïcödé — emoji 🐱\nsecond line",
        negative_prompt="размытый, плохое качество",
    )
    data = _png(params)
    assert b"iTXtparameters" in data, "non-latin-1 text must go in an iTXt chunk"

    _, sampler = _parse(data, tmp_path)
    assert sampler.prompts[0].value == params["prompt"]
    assert sampler.negative_prompts[0].value == params["negative_prompt"]

    text, spec = read_png_metadata(data)
    assert text is not None and text.startswith(params["prompt"])
    assert ImageSpec.from_params(spec) == ImageSpec.from_params(params)  # the image says how to render it again


def test_latin1_prompt_uses_plain_text_chunk(spec_params) -> None:
    data = _png(spec_params(prompt="café crème"))
    assert b"tEXtparameters" in data


def test_sd_parsers_reads_a_pil_image_too(spec_params) -> None:
    info = ParserManager().parse(Image.open(io.BytesIO(_png(spec_params()))))
    assert info is not None and info.samplers[0].name == "DPM++ 2M"


def test_read_png_metadata_returns_spec(spec_params) -> None:
    spec = {"image_id": "1234-abcd", "seed": 42, "steps": 25, "nested": {"b": 1, "a": [1, 2]}}
    data = _png(spec_params(), spec=spec)
    text, got = read_png_metadata(data)
    assert got == spec
    assert text == a1111_parameters(spec_params(), model_name="tiny", model_hash="abcdef1234")
    assert Image.open(io.BytesIO(data)).size == (16, 16)


def test_read_png_metadata_without_chunks() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    assert read_png_metadata(buffer.getvalue()) == (None, None)


def test_read_png_metadata_rejects_non_png() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    with pytest.raises(ValueError, match="expected a PNG"):
        read_png_metadata(buffer.getvalue())
    with pytest.raises(ValueError, match="not a readable image"):
        read_png_metadata(b"not an image")


def test_embeddings_are_named_with_a1111s_ti_hashes_line() -> None:
    sha_a, sha_b = "ab" * 32, "cd" * 32
    extra = a1111_extra({"mode": "txt2img", "embeddings": [{"name": "easyneg", "sha256": sha_a}, {"name": "style", "sha256": sha_b}]})
    assert extra["TI hashes"] == f"easyneg: {sha_a[:12]}, style: {sha_b[:12]}"
    parameters = a1111_parameters(
        {"prompt": "a cat, style", "negative_prompt": "easyneg", "steps": 4, "scheduler": "euler", "guidance_scale": 7,
         "seed": 1, "width": 64, "height": 64},
        model_name="tiny", model_hash=None, extra=extra,
    )
    assert parameters.splitlines()[-1].endswith(f'TI hashes: "easyneg: {sha_a[:12]}, style: {sha_b[:12]}"')
    assert "TI hashes" not in a1111_extra({"mode": "txt2img", "embeddings": []})
