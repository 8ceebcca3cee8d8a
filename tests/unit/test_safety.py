"""Safety per job: ``safety`` = off | flag | blur | drop, FARM_SAFETY and FARM_SAFETY_CHECKER.

The checker is a tiny random diffusers ``StableDiffusionSafetyChecker`` (tiny CLIP vision tower, saved
as safetensors) whose concept thresholds make its verdict certain: ``flags_all`` (thresholds -2: every
cosine similarity is above) and ``flags_none`` (thresholds +2). End to end, images are submitted to the
embedded farm and rendered by a worker context in this process (the tiny model on CPU, uploads waited
for), so what is checked is what the farm stores and records.
"""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from farm.client import Farm
from farm.db.tables import ImageRecord
from farm.errors import ConfigError, ValidationError
from farm.imaging.pnginfo import read_png_metadata
from farm.settings import Settings
from farm.storage.keys import image_key


# -- the tiny checker --------------------------------------------------------------------------------


def _make_checker(folder: Path, *, concept_threshold: float) -> Path:
    """A tiny StableDiffusionSafetyChecker in ``folder`` (config.json + model.safetensors; CLIP's 224 px
    preprocessing comes from the config farm ships) whose 17 concepts all have ``concept_threshold``."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=16)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                          vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    torch.manual_seed(0)
    model = StableDiffusionSafetyChecker(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    with torch.no_grad():
        model.concept_embeds_weights.fill_(concept_threshold)
        model.special_care_embeds_weights.fill_(2.0)  # no special-care concept, ever
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    return folder


@pytest.fixture(scope="module")
def flags_all(tmp_path_factory) -> Path:
    return _make_checker(tmp_path_factory.mktemp("checker") / "flags-all", concept_threshold=-2.0)


@pytest.fixture(scope="module")
def flags_none(tmp_path_factory) -> Path:
    return _make_checker(tmp_path_factory.mktemp("checker") / "flags-none", concept_threshold=2.0)


# -- an embedded farm and a worker in this process -----------------------------------------------


def _settings(farm_settings: Settings, tiny_model: Path, **values) -> Settings:
    """``farm_settings``' data folder, the session's tiny model, uploads awaited by each task."""
    return Settings(
        data_dir=farm_settings.data_dir, models={"tiny": str(tiny_model)}, default_model="tiny",
        render_overlap_tasks=False, upload_retries=0, **values,
    )


def _render_all(settings: Settings) -> None:
    """Render every queued image as a worker of ``settings`` would, one task at a time; return once
    each image is recorded."""
    from workers import tasks
    from workers.context import WorkerContext

    ctx = WorkerContext(settings=settings, model_name="tiny", device="cpu", node="test-worker")
    task = SimpleNamespace(
        request=SimpleNamespace(hostname="test", retries=0, id="task"),
        app=SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=False)),
    )
    before = signal.getsignal(signal.SIGTERM)
    try:
        with ctx.sessions() as session:
            by_task: dict[str, list[str]] = {}
            for image_id, task_id in session.execute(
                select(ImageRecord.id, ImageRecord.task_id).where(ImageRecord.status == "queued").order_by(ImageRecord.position)
            ):
                by_task.setdefault(task_id, []).append(image_id)
        for image_ids in by_task.values():
            try:
                tasks.run_render(task, ctx, image_ids, "tiny")
            except tasks.ImagesFailed:
                pass  # recorded with their reason; the test reads them
    finally:
        ctx.close(timeout=60)
        signal.signal(signal.SIGTERM, before)


def _rows(farm: Farm, submission_id: str) -> list[ImageRecord]:
    with farm.sessions() as session:
        rows = list(session.scalars(select(ImageRecord).where(ImageRecord.submission_id == submission_id).order_by(ImageRecord.position)))
        session.expunge_all()
    return rows


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def _high_frequency(data: bytes) -> float:
    """Mean absolute difference between neighbouring pixels: what a blur takes away."""
    pixels = _pixels(data)
    return float(np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean())


# -- settings and submit -----------------------------------------------------------------------------


def test_the_farm_default_is_off_and_a_policy_needs_a_checker(farm_settings, tmp_path, monkeypatch) -> None:
    assert farm_settings.safety == "off" and farm_settings.safety_checker is None
    with pytest.raises(ConfigError, match=r"bad setting FARM_SAFETY: 'drop' needs a safety checker: set FARM_SAFETY_CHECKER"):
        Settings(data_dir=tmp_path, safety="drop")
    with pytest.raises(ConfigError, match=r"FARM_SAFETY: Input should be 'off', 'flag', 'blur' or 'drop'"):
        Settings(data_dir=tmp_path, safety="strict", safety_checker=tmp_path)
    monkeypatch.setenv("FARM_SAFETY", "blur")
    monkeypatch.setenv("FARM_SAFETY_CHECKER", str(tmp_path / "checker"))
    assert (Settings().safety, Settings().safety_checker) == ("blur", tmp_path / "checker")


def test_a_request_without_safety_gets_the_farms_policy(farm_settings, tmp_path, make_request) -> None:
    from farm.request.spec import check_request

    assert check_request(make_request(), farm_settings).images[0].safety == "off"
    strict = Settings(data_dir=tmp_path, safety="blur", safety_checker=tmp_path)
    assert check_request(make_request(), strict).images[0].safety == "blur"
    assert check_request(make_request(safety="drop"), strict).images[0].safety == "drop"


def test_submit_refuses_a_check_the_farm_cannot_make_with_one_clear_line(embedded_farm, make_request, farm_cli, tmp_path) -> None:
    with pytest.raises(ValidationError) as refused:
        embedded_farm.submit(**make_request(safety="flag"))
    assert str(refused.value) == (
        "request 0: safety='flag' is invalid: needs a safety checker and this farm has none: set FARM_SAFETY_CHECKER to the "
        "checker's folder (on the submitters and the workers), or use safety=off"
    )
    with pytest.raises(ValidationError, match=r"safety='nsfw' is invalid: unknown safety policy; valid policies: off, flag, blur, drop"):
        embedded_farm.submit(**make_request(safety="nsfw"))
    with embedded_farm.sessions() as session:
        assert session.scalar(select(ImageRecord.id)) is None  # nothing recorded, nothing queued

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps(make_request(safety="drop")) + "\n")
    result = farm_cli("submit", "--file", requests)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: requests.jsonl line 1: safety='drop' is invalid: needs a safety checker and this farm has none: set "
        "FARM_SAFETY_CHECKER to the checker's folder (on the submitters and the workers), or use safety=off"
    ]
    result = farm_cli("submit", "--prompt", "a red cube", "--model", "tiny", "--safety", "blur")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "safety='blur' is invalid: needs a safety checker and this farm has none" in result.stderr


def test_a_request_may_only_be_stricter_than_the_farm(farm_settings, tmp_path, make_request) -> None:
    with Farm(Settings(data_dir=farm_settings.data_dir, safety="blur", safety_checker=tmp_path)) as farm:
        with pytest.raises(ValidationError) as refused:
            farm.submit(**make_request(safety="off"))
    assert str(refused.value) == (
        "request 0: safety='off' is invalid: must be at least as strict as the farm's FARM_SAFETY=blur; valid policies: blur, drop"
    )


# -- the checker ---------------------------------------------------------------------------------


def test_the_checker_decides_by_its_thresholds_and_an_absent_one_says_so(flags_all, flags_none, tmp_path) -> None:
    from workers.finishing.safety import AbsentChecker, ClipSafetyChecker, SafetyCheckerAbsent, load_checker

    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (96, 64), (0, 0, 0))]
    everything = ClipSafetyChecker(flags_all).check(images)
    assert [v.flagged for v in everything] == [True, True]
    assert all(v.scores["nsfw"] > 0 and v.scores["concepts"] == list(range(17)) for v in everything)
    nothing = ClipSafetyChecker(flags_none).check(images)
    assert [v.flagged for v in nothing] == [False, False]
    assert all(v.scores["nsfw"] < 0 and v.scores["concepts"] == [] and v.scores["special_care"] == [] for v in nothing)

    absent = load_checker(None)
    assert isinstance(absent, AbsentChecker)
    with pytest.raises(SafetyCheckerAbsent, match="this worker has no safety checker: set FARM_SAFETY_CHECKER"):
        absent.check(images)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(SafetyCheckerAbsent, match=r"needs config.json and model.safetensors \(found pytorch_model.bin: farm never unpickles"):
        load_checker(pickled).check(images)


# -- end to end ----------------------------------------------------------------------------------------


def test_off_flag_and_blur_end_to_end(farm_settings, tiny_model, flags_all, make_request) -> None:
    settings = _settings(farm_settings, tiny_model, safety_checker=flags_all)
    with Farm(settings) as farm:
        jobs = {policy: farm.submit(**make_request(safety=policy, seed=7)) for policy in ("off", "flag", "blur")}
        _render_all(settings)
        rows = {policy: _rows(farm, job.id)[0] for policy, job in jobs.items()}
        stored = {policy: farm.services.storage.get(row.storage_key) for policy, row in rows.items()}
        results = {policy: job.results()[0] for policy, job in jobs.items()}

    assert {policy: row.status for policy, row in rows.items()} == dict.fromkeys(jobs, "succeeded")
    # off: not checked, nothing recorded or written
    assert rows["off"].flagged is None and rows["off"].safety is None
    parameters, spec = read_png_metadata(stored["off"])
    assert "NSFW" not in parameters and "flagged" not in spec and spec["safety"] == "off"
    # flag: the verdict recorded, in the PNG, in the read model; the pixels are the render's
    assert rows["flag"].flagged is True
    assert rows["flag"].safety["policy"] == "flag" and rows["flag"].safety["action"] == "kept"
    assert rows["flag"].safety["checker"].startswith("StableDiffusionSafetyChecker@")
    assert rows["flag"].safety["scores"]["nsfw"] > 0
    parameters, spec = read_png_metadata(stored["flag"])
    assert parameters.splitlines()[-1].endswith(f"Safety: flag, NSFW: true, NSFW score: {rows['flag'].safety['scores']['nsfw']:.3f}")
    assert spec["flagged"] is True and spec["safety_verdict"] == rows["flag"].safety
    assert np.abs(_pixels(stored["flag"]) - _pixels(stored["off"])).max() <= 2  # the same render (CPU threads: ±1/255)
    assert results["flag"].flagged is True and results["flag"].safety == "flag"
    assert results["flag"].safety_verdict == rows["flag"].safety
    # blur: the stored PNG is the same render, blurred: much less high-frequency energy
    assert rows["blur"].flagged is True and rows["blur"].safety["action"] == "blurred"
    assert _high_frequency(stored["blur"]) < 0.35 * _high_frequency(stored["off"])
    assert np.abs(_pixels(stored["blur"]).mean(axis=(0, 1)) - _pixels(stored["off"]).mean(axis=(0, 1))).max() < 12  # same colours
    parameters, spec = read_png_metadata(stored["blur"])
    assert "Safety: blur, NSFW: true" in parameters and spec["safety_verdict"]["action"] == "blurred"


def test_drop_filters_counts_and_leaves_out_of_downloads_and_exports(farm_settings, tiny_model, flags_all, make_request, farm_cli, tmp_path) -> None:
    settings = _settings(farm_settings, tiny_model, safety_checker=flags_all)
    with Farm(settings) as farm:
        job = farm.submit(**make_request(safety="drop", num_images=2, seed=3))
        campaign = farm.campaign("safe-set")
        campaign.submit([
            {**make_request(safety="drop", seed=1), "id": "dropped"},
            {**make_request(safety="flag", seed=2), "id": "kept"},
        ])
        _render_all(settings)
        rows = _rows(farm, job.id)
        storage = farm.services.storage
        status = job.status()
        final = job.wait(timeout=5)
        downloaded = job.download(tmp_path / "download", partial=False)
        campaign_status = campaign.status()
        report = campaign.export(str(tmp_path / "dataset"))

    assert [row.status for row in rows] == ["filtered", "filtered"]
    for row in rows:
        assert row.flagged is True and row.safety["action"] == "dropped" and row.storage_key is None
        assert row.error.startswith("filtered by the safety checker (safety=drop): NSFW score +")
        assert not storage.exists(image_key(row.submission_id, row.id))  # no pixels stored
    assert status.counts["filtered"] == 2 and status.done and status.finished == 2
    assert final.succeeded  # the work ran as asked: `farm wait` exits 0
    assert str(status).endswith("2/2 finished (2 filtered)")
    assert downloaded == [] and (tmp_path / "download" / "metadata.jsonl").read_text() == ""

    assert campaign_status.counts["filtered"] == 1 and campaign_status.counts["succeeded"] == 1
    assert campaign_status.state == "finished" and "1 filtered" in str(campaign_status)
    assert report.exported == 1
    [exported] = [json.loads(line) for line in (tmp_path / "dataset" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert exported["safety"] == "flag" and exported["flagged"] is True and exported["safety_verdict"]["action"] == "kept"
    assert [p.name for p in (tmp_path / "dataset" / "train").glob("*.png")] == [exported["file_name"]]

    shown = farm_cli("status", job.id, FARM_MODELS=f"tiny={tiny_model}", FARM_SAFETY_CHECKER=str(flags_all))
    assert shown.exit_code == 0 and "2/2 finished (2 filtered)" in shown.stdout
    shown = farm_cli("campaign", "status", "safe-set", FARM_MODELS=f"tiny={tiny_model}")
    assert shown.exit_code == 0 and "1 succeeded" in shown.stdout and "1 filtered" in shown.stdout


def test_a_clean_verdict_is_recorded_and_the_image_kept(farm_settings, tiny_model, flags_none, make_request) -> None:
    settings = _settings(farm_settings, tiny_model, safety_checker=flags_none, safety="flag")
    with Farm(settings) as farm:
        job = farm.submit(**make_request(seed=5))  # FARM_SAFETY=flag
        strict = farm.submit(**make_request(seed=5, safety="drop"))
        _render_all(settings)
        [row], [dropped_not] = _rows(farm, job.id), _rows(farm, strict.id)
        parameters, spec = read_png_metadata(farm.services.storage.get(row.storage_key))
    assert row.status == dropped_not.status == "succeeded"
    assert row.flagged is False and row.safety["policy"] == "flag" and row.safety["scores"]["nsfw"] < 0
    assert dropped_not.flagged is False and dropped_not.safety["policy"] == "drop"
    assert "Safety: flag, NSFW: false" in parameters and spec["flagged"] is False


def test_a_worker_without_a_checker_fails_the_image_and_stores_nothing(farm_settings, tiny_model, flags_all, make_request) -> None:
    submitter = _settings(farm_settings, tiny_model, safety_checker=flags_all)
    with Farm(submitter) as farm:
        job = farm.submit(**make_request(safety="blur", seed=9))
        _render_all(_settings(farm_settings, tiny_model))  # this worker has no FARM_SAFETY_CHECKER
        [row] = _rows(farm, job.id)
        assert not farm.services.storage.exists(image_key(row.submission_id, row.id))
    assert row.status == "failed" and row.storage_key is None
    assert row.error.startswith("SafetyCheckerAbsent: this worker has no safety checker: set FARM_SAFETY_CHECKER")


def test_the_finisher_screens_before_storing(memory_storage) -> None:
    """Without a database: a dropped image is recorded with no key and its reason, a checked one with
    its verdict after its upload, one whose check cannot run is failed for good (never stored), and
    a failure to record a dropped image gives it back."""
    from workers.finishing.finisher import Finisher, Item
    from workers.finishing.safety import Screened, SafetyCheckerAbsent
    from workers.finishing.uploader import Uploader

    recorded, failed, given_back = {}, {}, []

    def screen(body: bytes) -> Screened:
        if body == b"drop":
            return Screened(None, {"flagged": True}, "filtered by the safety checker")
        if body == b"absent":
            raise SafetyCheckerAbsent("this worker has no safety checker")
        return Screened(body + b"-checked", {"flagged": False})

    def record(token, image_id, key, values):
        if image_id == "unrecordable":
            raise ConnectionError("database away")
        recorded[image_id] = (key, memory_storage.exists(key) if key else None, dict(values))
        return True

    finisher = Finisher(Uploader(memory_storage, workers=2), record=record, renew=lambda tokens: None, renew_every=60)
    finisher.screen = screen
    finisher.fail = lambda token, image_id, error: failed.setdefault(image_id, error) is not None
    handoff = finisher.hand_off("t", [
        Item(image_id=name, key=f"images/s/{name}.png", make=lambda body=body: body, values={"gpu_seconds": 1.0})
        for name, body in (("kept", b"png"), ("dropped", b"drop"), ("absent", b"absent"), ("unrecordable", b"drop"))
    ], give_back=lambda ids, error: given_back.append((ids, str(error))))
    assert handoff.wait(30) and finisher.close(timeout=30)

    assert recorded["kept"] == ("images/s/kept.png", True, {"gpu_seconds": 1.0, "flagged": False})
    assert memory_storage.get("images/s/kept.png") == b"png-checked"
    assert recorded["dropped"] == (None, None, {"gpu_seconds": 1.0, "flagged": True, "filtered": "filtered by the safety checker"})
    assert failed == {"absent": "SafetyCheckerAbsent: this worker has no safety checker"}
    assert given_back == [(["unrecordable"], "database away")]
    assert memory_storage.keys() == ["images/s/kept.png"]
    assert sorted(handoff.recorded) == ["absent", "dropped", "kept"] and handoff.failed == ["unrecordable"]
