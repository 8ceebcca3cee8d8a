"""Input images at submit: hostile and broken files refused with a clear message, nothing queued."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from farm import Farm, Settings, ValidationError
from farm.imaging.inputs import fit, output_size, prepare_image
from farm.settings import Limits


def png(width: int, height: int, colour=(200, 30, 30), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height, with a tiny (bogus) body: no pixel data to speak of."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def bomb() -> bytes:
    """A real decompression bomb: a few KB of zlib that inflates to a 12000×12000 image."""
    out = io.BytesIO()
    Image.new("L", (12000, 12000), 0).save(out, format="PNG", optimize=True)
    return out.getvalue()


@pytest.fixture
def farm(tmp_path):
    with Farm(Settings(data_dir=tmp_path / "data")) as f:
        yield f


def files(tmp_path: Path) -> dict[str, Path]:
    cases = {
        "bomb.png": bomb(),
        "tiny.png": png(1, 1),
        "huge-header.png": png_header_only(20000, 20000),
        "truncated.png": png(256, 256, (10, 200, 90))[:-200],
        "anim.gif": (lambda b: (Image.new("RGB", (64, 64)).save(b, format="GIF"), b.getvalue())[1])(io.BytesIO()),
        "not-an-image.png": b"%PDF-1.4 this is not an image at all\n" * 10,
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("bomb.png", "pixels"),
        ("tiny.png", "at least 16 pixels"),
        ("huge-header.png", "pixels"),
        ("truncated.png", "truncated or corrupt"),
        ("anim.gif", "only PNG, JPEG, WEBP"),
        ("not-an-image.png", "not a readable PNG, JPEG or WebP"),
    ],
)
def test_bad_init_images_are_refused_at_submit(farm, tmp_path, name, says):
    path = files(tmp_path)[name]
    with pytest.raises(ValidationError) as caught:
        farm.submit("a red circle", init_image=str(path), width=64, height=64)
    assert caught.value.field == "init_image"
    assert says in str(caught.value) and name in str(caught.value)
    assert farm.latest() == []  # nothing written, nothing queued
    assert not list((farm.settings.data_dir / "images").rglob("*.png"))  # nothing uploaded


def test_a_mask_of_the_wrong_size_is_refused(farm, tmp_path):
    with pytest.raises(ValidationError) as caught:
        farm.submit("a red circle", init_image=png(128, 128), mask=png(64, 64, (255,), mode="L"))
    assert caught.value.field == "mask" and "64x64" in str(caught.value) and "128x128" in str(caught.value)
    assert farm.latest() == []


def test_options_without_an_init_image_are_refused(farm):
    with pytest.raises(ValidationError) as caught:
        farm.submit("x", strength=0.5, width=64, height=64)
    assert caught.value.field == "strength"
    with pytest.raises(ValidationError) as caught:
        farm.submit("x", init_image=png(64, 64), strength=1.5)
    assert caught.value.field == "strength" and "between 0 and 1" in str(caught.value)


def test_size_follows_the_init_image_rounded_down_to_multiples_of_8(farm):
    job = farm.submit("x", init_image=png(203, 130), steps=2)
    result = job.results()[0]
    assert (result.width, result.height) == (200, 128)
    assert output_size(203, 130) == (200, 128)
    explicit = farm.submit("x", init_image=png(203, 130), width=64, height=96, steps=2).results()[0]
    assert (explicit.width, explicit.height) == (64, 96)


def test_the_same_picture_is_uploaded_once_by_content(farm, tmp_path):
    data = png(96, 96, (1, 2, 3))
    (tmp_path / "a.png").write_bytes(data)
    farm.submit_many([{"prompt": "x", "init_image": str(tmp_path / "a.png")}, {"prompt": "y", "init_image": data}])
    stored = [p for p in (farm.settings.data_dir / "images").rglob("*.png")]
    assert len(stored) == 1 and stored[0].parent.parent.name == "inputs"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    prepared = prepare_image(out.getvalue(), field="init_image", limits=Limits())
    assert (prepared.width, prepared.height) == (20, 40)


@pytest.mark.parametrize(("mode", "size"), [("resize", (64, 32)), ("crop", (64, 32)), ("fill", (64, 32))])
def test_resize_modes_give_the_requested_size(mode, size):
    source = Image.new("RGB", (100, 100), (0, 0, 255))
    out = fit(source, *size, mode)
    assert out.size == size
    if mode == "fill":  # padded, not stretched: the borders are the fill colour
        assert out.getpixel((0, 16)) == (0, 0, 0) and out.getpixel((32, 16)) == (0, 0, 255)
