"""Object keys are built from ids and hashes only; anything else is refused, by every storage backend
(and by the in-memory fake the unit tests store into)."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from farm.storage.keys import content_key, image_key

SUB = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
IMG = "11111111-2222-3333-4444-555555555555"
SHA = hashlib.sha256(b"lora").hexdigest()


@pytest.mark.parametrize(
    ("submission_id", "image_id", "expected"),
    [
        (SUB, IMG, f"images/11/{SUB}/{IMG}.png"),
        ("a", "0", "images/0/a/0.png"),
        ("deadbeef", "f" * 64, f"images/ff/deadbeef/{'f' * 64}.png"),
        (str(uuid.UUID(int=1)), str(uuid.UUID(int=2)), f"images/00/{uuid.UUID(int=1)}/{uuid.UUID(int=2)}.png"),
        ("0123456789abcdef0123456789abcdef", IMG, f"images/11/0123456789abcdef0123456789abcdef/{IMG}.png"),
    ],
)
def test_image_key_good_ids(submission_id: str, image_id: str, expected: str) -> None:
    assert image_key(submission_id, image_id) == expected


def test_image_keys_of_one_submission_spread_over_shards_and_stay_deterministic() -> None:
    """One campaign's images land under 256 prefixes (S3 limits PUT/s per prefix), each image always
    on the same key."""
    ids = [str(uuid.uuid4()) for _ in range(2000)]
    keys = [image_key(SUB, image_id) for image_id in ids]
    assert keys == [image_key(SUB, image_id) for image_id in ids]
    shards = {key.split("/")[1] for key in keys}
    assert len(shards) > 200 and all(len(shard) == 2 for shard in shards)
    assert all(key == f"images/{i[:2]}/{SUB}/{i}.png" for key, i in zip(keys, ids))


BAD_IDS = [
    pytest.param("../x", id="traversal"),
    pytest.param("..", id="dotdot"),
    pytest.param("a/b", id="slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("/abc", id="absolute"),
    pytest.param("ABCDEF", id="uppercase"),
    pytest.param(IMG.replace("1", "A"), id="uppercase-uuid"),
    pytest.param("", id="empty"),
    pytest.param(" ", id="space"),
    pytest.param("ab cd", id="inner-space"),
    pytest.param("abc\n", id="trailing-newline"),
    pytest.param("a red cube on a table", id="user-text"),
    pytest.param("cat.png", id="dot"),
    pytest.param("-abc", id="leading-dash"),
    pytest.param("abc-", id="trailing-dash"),
    pytest.param("g00d", id="not-hex"),
    pytest.param("a" * 65, id="too-long"),
    pytest.param("ａｂｃ", id="fullwidth"),
    pytest.param(123, id="not-a-string"),
    pytest.param(None, id="none"),
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_image_key_rejects_bad_submission_id(bad: object) -> None:
    with pytest.raises(ValueError, match="submission_id"):
        image_key(bad, IMG)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_image_key_rejects_bad_image_id(bad: object) -> None:
    with pytest.raises(ValueError, match="image_id"):
        image_key(SUB, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "sha256", "ext", "expected"),
    [
        ("loras", SHA, "safetensors", f"loras/{SHA[:2]}/{SHA}.safetensors"),
        ("inputs", SHA, "png", f"inputs/{SHA[:2]}/{SHA}.png"),
        ("input_images", "0" * 64, "jpg", f"input_images/00/{'0' * 64}.jpg"),
    ],
)
def test_content_key_good(kind: str, sha256: str, ext: str, expected: str) -> None:
    assert content_key(kind, sha256, ext) == expected


@pytest.mark.parametrize(
    ("kind", "sha256", "ext", "field"),
    [
        ("Loras", SHA, "png", "kind"),
        ("../loras", SHA, "png", "kind"),
        ("lo ras", SHA, "png", "kind"),
        ("", SHA, "png", "kind"),
        ("loras/x", SHA, "png", "kind"),
        ("loras", SHA.upper(), "png", "sha256"),
        ("loras", SHA[:63], "png", "sha256"),
        ("loras", SHA + "0", "png", "sha256"),
        ("loras", "../" + SHA[3:], "png", "sha256"),
        ("loras", "g" * 64, "png", "sha256"),
        ("loras", SHA, ".png", "ext"),
        ("loras", SHA, "PNG", "ext"),
        ("loras", SHA, "png/../x", "ext"),
        ("loras", SHA, "", "ext"),
        ("loras", SHA, "tar.gz", "ext"),
    ],
)
def test_content_key_bad(kind: str, sha256: str, ext: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        content_key(kind, sha256, ext)


# -- the storage contract: the in-memory fake the unit tests use behaves as the real backends ------


@pytest.fixture(params=["file", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path):
    """FileStorage (real) and the tests' MemoryStorage (tests/conftest.py), one contract."""
    from farm.storage import FileStorage

    return FileStorage(tmp_path / "store") if request.param == "file" else request.getfixturevalue("memory_storage")


def test_storage_round_trip(storage) -> None:
    from farm.storage import Storage

    assert isinstance(storage, Storage)
    key = image_key(SUB, IMG)
    assert not storage.exists(key)
    storage.put(key, b"\x89PNG one", content_type="image/png", metadata={"image-id": IMG, "farm-seed": "7"})
    storage.put(key, b"\x89PNG two", content_type="image/png", metadata={"image-id": IMG, "farm-seed": "8"})  # replaces
    assert storage.exists(key)
    assert storage.get(key) == b"\x89PNG two"
    assert storage.head(key) == {"image-id": IMG, "farm-seed": "8"}
    assert storage.content_type(key) == "image/png"
    assert storage.key_of(storage.uri(key)) == key
    assert storage.key_of("s3://elsewhere/" + key) is None
    storage.delete(key)
    storage.delete(key)  # deleting a missing object is not an error
    assert not storage.exists(key)


def test_storage_missing_object_is_missing_object(storage) -> None:
    from farm.errors import FarmError, MissingObject

    key = content_key("loras", SHA, "safetensors")
    with pytest.raises(MissingObject, match="no object"):
        storage.get(key)
    with pytest.raises(MissingObject):
        storage.head(key)
    assert issubclass(MissingObject, FarmError)


@pytest.mark.parametrize("key", ["", "/abs/x.png", "a/../b.png", "a//b.png", ".hidden", "a\\b", "x.png.meta.json"])
def test_storage_refuses_keys_that_could_escape(storage, key: str) -> None:
    with pytest.raises(ValueError, match="object key"):
        storage.put(key, b"x", content_type="image/png")
    with pytest.raises(ValueError, match="object key"):
        storage.get(key)


@pytest.mark.parametrize("metadata", [{"Image_ID": "1"}, {"prompt": "ünïcödé"}, {"big": "x" * 3000}])
def test_storage_refuses_metadata_s3_cannot_carry(storage, metadata: dict) -> None:
    with pytest.raises(ValueError, match="metadata"):
        storage.put(image_key(SUB, IMG), b"x", content_type="image/png", metadata=metadata)
    assert not storage.exists(image_key(SUB, IMG))
