"""Textual-inversion embeddings: the registry (``farm embedding``), what submit records, and the worker
expanding names into vectors on the tiny model (CPU, offline; embeddings made here, random vectors)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from safetensors.numpy import save, save_file
from sqlalchemy import select

from farm.db.tables import ImageRecord
from farm.embeddings import Matcher
from farm.settings import BUILTIN_TINY

SD1 = 768


def a1111(path, vectors: int, width: int = SD1, seed: int = 0, key: str = "emb_params"):
    rng = np.random.default_rng(seed)
    save_file({key: rng.normal(0, 1, (vectors, width)).astype(np.float32)}, str(path), metadata={"name": "x"})
    return path


def diffusers(path, width: int = SD1, seed: int = 0, token: str = "<cat-toy>", vectors: int | None = None):
    rng = np.random.default_rng(seed)
    shape = (width,) if vectors is None else (vectors, width)
    save_file({token: rng.normal(0, 1, shape).astype(np.float16)}, str(path))
    return path


# -- the registry and the CLI -------------------------------------------------------------------------


def test_both_layouts_register_list_and_remove(farm_cli, tmp_path):
    result = farm_cli("embedding", "add", a1111(tmp_path / "neg.safetensors", 4), "--name", "EasyNeg")
    assert result.exit_code == 0, result.output
    assert "a1111, 4 vectors of 768" in result.stdout
    result = farm_cli("embedding", "add", diffusers(tmp_path / "toy.safetensors"), "--name", "cat-toy")
    assert result.exit_code == 0, result.output
    assert "diffusers, 1 vectors of 768" in result.stdout
    result = farm_cli("embedding", "add", a1111(tmp_path / "s2p.safetensors", 2, key="string_to_param.*"), "--name", "s2p")
    assert result.exit_code == 0 and "a1111, 2 vectors" in result.stdout, result.output
    listed = farm_cli("embedding", "list").stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["EasyNeg", "cat-toy", "s2p"]
    assert listed[0].split("\t")[2:] == ["a1111", "4", "768"]
    again = farm_cli("embedding", "add", tmp_path / "toy.safetensors", "--name", "easyneg")
    assert again.exit_code == 2 and "is taken" in again.stderr  # names match prompts case-insensitively
    assert farm_cli("embedding", "remove", "cat-toy").exit_code == 0
    assert [line.split("\t")[0] for line in farm_cli("embedding", "list").stdout.splitlines()] == ["EasyNeg", "s2p"]
    missing = farm_cli("embedding", "remove", "cat-toy")
    assert missing.exit_code == 2 and "no embedding named" in missing.stderr


def test_a_1024_wide_embedding_is_refused_naming_file_and_widths(farm_cli, tmp_path):
    path = a1111(tmp_path / "sd2-style.safetensors", 2, width=1024)
    result = farm_cli("embedding", "add", path, "--name", "sd2style")
    assert result.exit_code == 2
    assert "sd2-style.safetensors" in result.stderr and "width 1024" in result.stderr and "expected 768" in result.stderr
    assert farm_cli("embedding", "list").stdout == ""


def test_a_configured_models_width_is_accepted(farm_cli, tmp_path, tiny_model):
    """The tiny test model's text encoder is 32 wide: its embeddings fit it (and only it)."""
    result = farm_cli("embedding", "add", a1111(tmp_path / "t.safetensors", 2, width=32), "--name", "tinyemb",
                      FARM_MODELS=f"tiny={tiny_model}")
    assert result.exit_code == 0, result.output
    assert farm_cli("embedding", "add", tmp_path / "t.safetensors", "--name", "other").exit_code == 2  # no such model


def test_pickles_and_odd_files_are_refused(farm_cli, tmp_path):
    pt = tmp_path / "easynegative.pt"
    pt.write_bytes(pickle.dumps({"string_to_param": {"*": [0.0]}}))
    result = farm_cli("embedding", "add", pt, "--name", "easynegative")
    assert result.exit_code == 2 and "never unpickles" in result.stderr
    renamed = tmp_path / "easynegative.safetensors"
    renamed.write_bytes(pickle.dumps({"boom": 1}))
    result = farm_cli("embedding", "add", renamed, "--name", "easynegative")
    assert result.exit_code == 2 and ("pickle" in result.stderr or "safetensors" in result.stderr)
    save_file({"a": np.zeros((2, SD1), np.float32), "b": np.zeros((2, SD1), np.float32)}, str(tmp_path / "two.safetensors"))
    result = farm_cli("embedding", "add", tmp_path / "two.safetensors", "--name", "two")
    assert result.exit_code == 2 and "expected one embedding tensor" in result.stderr
    save_file({"clip_l": np.zeros((2, SD1), np.float32), "clip_g": np.zeros((2, 1280), np.float32)}, str(tmp_path / "xl.safetensors"))
    result = farm_cli("embedding", "add", tmp_path / "xl.safetensors", "--name", "xl")
    assert result.exit_code == 2 and "SDXL" in result.stderr
    assert farm_cli("embedding", "add", a1111(tmp_path / "ok.safetensors", 1), "--name", "BREAK").exit_code == 2
    assert farm_cli("embedding", "list").stdout == ""


# -- at submit: which embeddings a request uses, recorded in its images' params -------------------------


def test_matcher_finds_names_used_as_words():
    matcher = Matcher([("easynegative", "a" * 64), ("easyneg", "b" * 64), ("bad-hands-5", "c" * 64)])
    assert matcher.find("photo, EasyNegative") == (("easynegative", "a" * 64),)
    assert matcher.find("(easynegative:1.2), [easyneg]") == (("easyneg", "b" * 64), ("easynegative", "a" * 64))
    assert matcher.find("easynegatives, uneasyneg, easy negative") == ()  # unknown words are just words
    assert matcher.find("a cat", None, 3) == ()
    assert matcher.find("hands: bad-hands-5.") == (("bad-hands-5", "c" * 64),)
    assert not Matcher([]) and Matcher([]).find("anything") == ()


def test_submit_records_the_embeddings_prompts_use(embedded_farm, make_request, tmp_path):
    from farm import embeddings

    services = embedded_farm.services
    neg = embeddings.add(services, a1111(tmp_path / "n.safetensors", 3, seed=1), "easynegative")
    toy = embeddings.add(services, diffusers(tmp_path / "t.safetensors", seed=2), "cat-toy")
    submission = embedded_farm.submit_many([
        make_request(prompt="a cat-toy on a table", negative_prompt="blurry, EasyNegative", num_images=2, seed=5),
        make_request(prompt="a plain cat, easynegatives"),
    ])
    with embedded_farm.sessions() as session:
        images = session.scalars(
            select(ImageRecord).where(ImageRecord.submission_id == submission.id).order_by(ImageRecord.position)
        ).all()
        params = [image.params for image in images]
    expected = [{"name": "cat-toy", "sha256": toy.sha256}, {"name": "easynegative", "sha256": neg.sha256}]
    assert params[0]["embeddings"] == params[1]["embeddings"] == expected
    assert params[2]["embeddings"] == []
    from farm.request.spec import ImageSpec

    spec = ImageSpec.from_params(params[0])
    assert spec.embeddings == (("cat-toy", toy.sha256), ("easynegative", neg.sha256))
    assert ImageSpec.from_params(spec.params()) == spec
    # a later rename cannot change what a queued image uses
    embeddings.remove(services, "cat-toy")
    assert ImageSpec.from_params(params[0]).embeddings == spec.embeddings


# -- on the worker: names expanded into vectors on the tiny model ---------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from workers.diffusion.embeddings import EmbeddingStore
    from workers.diffusion.pipeline import load_pipeline

    loaded = load_pipeline("tiny", BUILTIN_TINY, models_dir=tmp_path_factory.mktemp("models"), device="cpu")
    files: dict[str, bytes] = {}
    loaded.embeddings = EmbeddingStore(loaded.pipe, fetch=files.__getitem__, max_loaded=2)
    loaded.embeddings.files = files
    return loaded


def _register(model, data: bytes) -> str:
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    model.embeddings.files[sha] = data
    return sha


def _tiny_a1111(vectors: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save({"emb_params": rng.normal(0, 0.5, (vectors, 32)).astype(np.float32)})


def _tiny_diffusers(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save({"<toy>": rng.normal(0, 0.5, (32,)).astype(np.float16)})


def _render(model, make_spec, **spec):
    from workers.diffusion.render import render_batch

    result = render_batch(model, [make_spec(**spec)], base_scheduler_config=model.scheduler_config)
    return np.asarray(result.images[0].image).astype(np.int16), result.images[0]


def test_windows_expand_a_name_into_its_vectors(model):
    from workers.diffusion.prompts import token_count, windows

    sha = _register(model, _tiny_a1111(3, seed=3))
    active = model.embeddings.activate([("inkblot", sha)])
    rows = active.ids["inkblot"]
    base = model.pipe.text_encoder.config.vocab_size  # the model's own rows
    assert len(rows) == 3 and min(rows) >= base
    plain = windows(model.pipe, "a red circle, InkBlot")[0]
    expanded = windows(model.pipe, "a red circle, (InkBlot:1.5)", embeddings=active)[0]
    assert expanded.tokens[-3:] == list(rows) and expanded.weights[-3:] == [1.5] * 3
    assert token_count(model.pipe, "a red circle, inkblot", active) == token_count(model.pipe, "a red circle,") + 3
    assert plain.tokens[: len(expanded.tokens) - 3] == expanded.tokens[:-3]
    # an embedding never straddles two windows
    long = windows(model.pipe, "a " * 73 + "inkblot", embeddings=active)
    assert [len(w.tokens) for w in long] == [73, 3]
    # the matrix keeps the model's own rows bit for bit
    assert model.pipe.text_encoder.get_input_embeddings().weight.shape[0] == min(rows) + 3


@pytest.mark.parametrize("layout", ["a1111", "diffusers"])
def test_an_embedding_changes_the_image_and_unregistered_names_are_words(model, make_spec, layout):
    data = _tiny_a1111(2, seed=11) if layout == "a1111" else _tiny_diffusers(seed=12)
    sha = _register(model, data)
    prompt = "a red circle, inkstyle"
    without, _ = _render(model, make_spec, prompt=prompt)
    with_it, rendered = _render(model, make_spec, prompt=prompt, embeddings=(("inkstyle", sha),))
    assert np.abs(with_it - without).max() > 0
    from workers.diffusion.prompts import token_count

    assert rendered.prompt_tokens == token_count(model.pipe, "a red circle,") + (2 if layout == "a1111" else 1)
    # the embedding is loaded now, yet a spec that does not list it keeps the word a word
    again, _ = _render(model, make_spec, prompt=prompt)
    assert np.array_equal(again, without)
    # weighted, in a long prompt (two windows)
    long = "a photo of a red circle on a blue background, " * 8 + "(inkstyle:1.3)"
    long_without, _ = _render(model, make_spec, prompt=long)
    long_with, _ = _render(model, make_spec, prompt=long, embeddings=(("inkstyle", sha),))
    assert np.abs(long_with - long_without).max() > 0


def test_a_negative_prompt_embedding_works(model, make_spec):
    sha = _register(model, _tiny_a1111(4, seed=21))
    without, _ = _render(model, make_spec, prompt="a red circle", negative_prompt="blurry, badstuff")
    with_it, _ = _render(model, make_spec, prompt="a red circle", negative_prompt="blurry, badstuff",
                         embeddings=(("badstuff", sha),))
    assert np.abs(with_it - without).max() > 0


def test_the_store_is_bounded_and_refuses_a_wrong_width(model):
    from workers.diffusion.embeddings import EmbeddingError

    shas = [_register(model, _tiny_a1111(1, seed=40 + n)) for n in range(3)]
    for n, sha in enumerate(shas):
        model.embeddings.activate([(f"e{n}", sha)])
    assert model.embeddings.loaded() == shas[1:]  # max_loaded=2: the least recently used went
    rows = model.embeddings.activate([("e2", shas[2])]).ids["e2"]
    weight = model.pipe.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == max(rows) + 1 == model.pipe.text_encoder.config.vocab_size + 2
    wide = _register(model, save({"emb_params": np.zeros((1, 768), np.float32)}))
    with pytest.raises(EmbeddingError, match="width 768; this model's text encoder takes 32"):
        model.embeddings.activate([("wide", wide)])


def test_the_worker_fetches_embeddings_through_its_disk_cache(tmp_path, memory_storage):
    import hashlib

    from farm.errors import RenderError
    from farm.settings import Settings
    from farm.storage.keys import content_key
    from workers.context import WorkerContext
    from workers.diffusion.embeddings import EmbeddingError, EmbeddingStore

    data = save({"emb_params": np.ones((2, 32), np.float32)})
    sha = hashlib.sha256(data).hexdigest()
    memory_storage.put(content_key("embeddings", sha, "safetensors"), data, content_type="application/octet-stream")
    ctx = WorkerContext(Settings(data_dir=tmp_path / "data"), model_name="tiny", device="cpu")
    ctx._storage = memory_storage
    assert ctx._embedding_bytes(sha) == data
    assert (tmp_path / "data" / "cache" / "embeddings" / f"{sha}.safetensors").read_bytes() == data
    store = EmbeddingStore(object(), fetch=ctx._embedding_bytes)
    with pytest.raises(EmbeddingError, match="cannot be fetched") as caught:
        store.activate([("gone", "0" * 64)])
    assert isinstance(caught.value, RenderError)  # the batch's images fail with the reason, not the worker


def test_submit_to_worker_end_to_end(tmp_path, tiny_model, monkeypatch, make_request):
    """Registered and submitted on the light side, rendered by ``workers.tasks.run_render``: the stored
    image is the one the spec's embedding makes, not the plain words'."""
    import io
    import uuid
    from types import SimpleNamespace

    from PIL import Image

    from farm import Farm, embeddings
    from farm.request.spec import ImageSpec
    from farm.settings import Settings
    from farm.storage.keys import image_key
    from workers import tasks
    from workers.context import WorkerContext
    from workers.diffusion.pipeline import load_pipeline
    from workers.diffusion.render import render_batch

    for name in [name for name in __import__("os").environ if name.startswith("FARM_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=tmp_path / "data", models={"tiny": str(tiny_model)}, max_batch_size=8, upload_retries=0)
    monkeypatch.setattr(tasks, "publish_images", lambda *a, **k: None)
    with Farm(settings) as farm:
        path = tmp_path / "glow.safetensors"
        path.write_bytes(_tiny_a1111(3, seed=77))
        record = embeddings.add(farm.services, path, "glow")
        submission = farm.submit_many([make_request(prompt="a red circle, (glow:1.2)", seed=3)])
        with farm.sessions() as session:
            (row,) = session.scalars(select(ImageRecord).where(ImageRecord.submission_id == submission.id)).all()
        assert row.params["embeddings"] == [{"name": "glow", "sha256": record.sha256}]

        model = load_pipeline("tiny", str(tiny_model), models_dir=tiny_model.parent, device="cpu")
        ctx = WorkerContext(settings=settings, model_name="tiny", device="cpu")
        ctx._sessions, ctx._storage, ctx._model = farm.sessions, farm.storage, model
        ctx._attach_text_caches(model)
        app = SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=False))
        task = SimpleNamespace(request=SimpleNamespace(hostname="cpu0@test", retries=0, id=str(uuid.uuid4())), app=app)
        outcome = tasks.run_render(task, ctx, [row.id], "tiny")
        assert ctx.finisher.wait(timeout=60)
        assert outcome["rendered"] == 1, outcome
        stored = np.asarray(Image.open(io.BytesIO(farm.storage.get(image_key(row.submission_id, row.id)))).convert("RGB"), np.int16)
        spec = ImageSpec.from_params(row.params)
        plain = render_batch(model, [ImageSpec(**{**spec.params(), "embeddings": ()})], base_scheduler_config=model.scheduler_config)
        plain_pixels = np.asarray(plain.images[0].image.convert("RGB"), np.int16)
        assert np.abs(stored - plain_pixels).max() > 0
        again = render_batch(model, [spec], base_scheduler_config=model.scheduler_config)
        assert np.abs(stored - np.asarray(again.images[0].image.convert("RGB"), np.int16)).max() <= 1
        assert model.prompt_cache.hits >= 1  # the second render of the same prompt skipped the encoder
        ctx.close(timeout=10)
