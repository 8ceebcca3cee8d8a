"""One way in: the Python client, the CLI and campaign rows give the same images the same parameters,
taken from the one model catalogue; errors come from one tree; re-published work keeps its priority.

Embedded farm only (SQLite, the filesystem broker, file storage in a temp folder; the
``embedded_farm`` fixture), the CLI in this process (``farm_cli``): no service, no subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from farm import ConfigError, Farm, Settings
from farm.catalogue import Catalogue
from farm.db.tables import CampaignRecord, ImageRecord
from farm.errors import FarmError, InputError, LoraError, MissingObject, PublishError
from farm.request.spec import check_request
from farm.settings import shipped_model

SHAPES = shipped_model("shapes")
SHAPES_DEFAULTS = json.loads((SHAPES / "farm.json").read_text())


def _asked(result) -> dict:
    data = result.metadata()
    return {k: data[k] for k in ("prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler",
                                 "model", "mode", "strength", "clip_skip", "loras")}


def test_a_campaign_row_gets_the_same_parameters_as_the_same_plain_request(embedded_farm: Farm, tmp_path: Path) -> None:
    """Before: a campaign row of the default (shapes) model rendered at 512×512, a plain request at 64×64."""
    farm = embedded_farm
    job = farm.submit("a red circle on a blue background", seed=7)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a red circle on a blue background", "seed": 7}) + "\n")
    farm.campaign("same").submit(rows)
    [plain] = job.results()
    [row] = list(farm.campaign("same").images(status=None))
    assert _asked(plain) == _asked(row)
    assert (row.width, row.height, row.steps, row.guidance_scale) == (
        SHAPES_DEFAULTS["width"], SHAPES_DEFAULTS["height"], SHAPES_DEFAULTS["default_steps"],
        SHAPES_DEFAULTS["default_guidance_scale"],
    )


def test_request_values_win_over_the_model_and_the_model_over_the_settings(farm_settings: Settings) -> None:
    settings = Settings(data_dir=farm_settings.data_dir, default_steps=33, default_guidance_scale=3.0, default_size=128,
                        models={"shapes": "builtin:shapes", "tiny": "builtin:tiny"})
    catalogue = Catalogue(settings)
    shapes, tiny = catalogue.defaults("shapes"), catalogue.defaults("tiny")
    assert (shapes.width, shapes.steps, shapes.guidance_scale) == (64, 20, 5.0)  # its farm.json
    assert (tiny.width, tiny.height, tiny.steps, tiny.guidance_scale) == (128, 128, 33, 3.0)  # the settings
    with Farm(settings) as farm:
        [image] = farm.submit("x", model="tiny", steps=4, width=64).results()
    assert (image.steps, image.width, image.height, image.guidance_scale) == (4, 64, 128, 3.0)


def test_a_campaign_row_carries_loras_an_init_image_and_image_options(embedded_farm: Farm, tmp_path: Path) -> None:
    """Before: "must be resolved against the registry (submit through Farm)"."""
    farm = embedded_farm
    farm.add_lora(SHAPES / "loras" / "green.safetensors", name="green")
    folder = tmp_path / "set"
    (folder / "in").mkdir(parents=True)
    Image.new("RGB", (72, 48), (10, 20, 200)).save(folder / "in" / "start.png")
    (folder / "rows.csv").write_text(
        "prompt,init_image,loras,strength,clip_skip,resize_mode,width,height\n"
        "a red circle,in/start.png,green:0.8,0.5,2,crop,64,64\n"
    )
    farm.campaign("rows").submit(folder / "rows.csv")
    [row] = list(farm.campaign("rows").images(status=None))
    assert row.mode == "img2img" and row.strength == 0.5 and row.clip_skip == 2 and row.resize_mode == "crop"
    assert row.init_image_key.startswith("inputs/") and farm.storage.exists(row.init_image_key)
    assert [weight for _, weight in row.loras] == [0.8]


def test_an_image_by_a_uri_of_the_farms_own_storage(embedded_farm: Farm, tmp_path: Path) -> None:
    farm = embedded_farm
    Image.new("RGB", (64, 64), (200, 0, 0)).save(tmp_path / "a.png")
    [first] = farm.submit("x", init_image=str(tmp_path / "a.png")).results()
    uri = farm.storage.uri(first.init_image_key)
    [again] = farm.submit("x", init_image=uri).results()
    assert again.init_image_key == first.init_image_key
    with pytest.raises(FarmError, match="init_image.*outside the farm's storage"):
        farm.submit("x", init_image="s3://elsewhere/photo.png")


def test_a_bad_row_names_its_file_line_and_field_and_writes_nothing(embedded_farm: Farm, tmp_path: Path) -> None:
    farm = embedded_farm
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt,loras\nok,\nbad,nobody:0.5\n")
    with pytest.raises(FarmError, match=r"rows.csv line 3: loras\[0\]='nobody' is invalid: is not a registered LoRA"):
        farm.campaign("bad").submit(rows)
    with farm.sessions() as session:
        assert session.query(ImageRecord).count() == 0


def test_the_shipped_lora_registers_with_the_default_settings(embedded_farm: Farm) -> None:
    """Before: builtin:shapes resolved to another folder in the registry, so the LoRA fitted no base."""
    farm = embedded_farm
    record = farm.add_lora(SHAPES / "loras" / "green.safetensors", name="green")
    assert record.base in ("sd1", "shapes")
    assert Catalogue(farm.settings).folder("shapes") == SHAPES


def test_a_bad_setting_is_a_config_error_for_library_users(monkeypatch, farm_settings, tmp_path: Path) -> None:
    """Before: pydantic_core.ValidationError reached library users."""
    monkeypatch.setenv("FARM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FARM_MAX_BATCH_SIZE", "0")
    with pytest.raises(ConfigError, match="bad setting FARM_MAX_BATCH_SIZE"):
        Farm.from_env()
    monkeypatch.setenv("FARM_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("FARM_DATABASE_URL", "postgresql://farm:hunter2@db/farm")
    monkeypatch.setenv("FARM_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(ConfigError) as caught:
        Settings()
    assert "hunter2" not in str(caught.value) and "FARM_S3_ADDRESSING_STYLE" in str(caught.value)


def test_every_error_is_in_the_one_tree_and_exported() -> None:
    import farm

    for error in (PublishError, MissingObject, InputError, LoraError, ConfigError):
        assert issubclass(error, FarmError)
        assert getattr(farm, error.__name__) is error
    from farm.storage import S3Storage  # before: ImportError, though a docstring said it works

    assert S3Storage.__module__ == "farm.storage.s3"


def test_cli_defaults_are_the_models_own(farm_cli, embedded_farm: Farm) -> None:
    """Before: --steps 25 --guidance-scale 7.5 (help: 512×512) whatever the model."""
    out = farm_cli("submit", "--prompt", "a red circle")
    assert out.exit_code == 0, out.stderr
    [image] = embedded_farm.submission(out.stdout.strip()).results()
    assert (image.width, image.height, image.steps, image.guidance_scale) == (64, 64, 20, 5.0)


def test_published_again_keeps_its_campaign_priority_and_task(farm_settings: Settings, tmp_path: Path) -> None:
    """Before: images queued again by a worker or the sweeper went out at priority 0."""
    from farm.dispatch import publish as dispatch

    settings = Settings(data_dir=farm_settings.data_dir, campaign_priority=7)
    sent = []
    with Farm(settings) as farm:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"prompt": "x", "num_images": 2}) + "\n")
        farm.campaign("c").submit(rows)
        plain = farm.submit("y")
        with farm.sessions() as session:
            ids = {r.id: (r.task_id, r.campaign_id) for r in session.query(ImageRecord)}
            priority = session.query(CampaignRecord).one().priority

        def capture(app, batches, settings, **kwargs):
            sent.extend((b.task_id, b.priority, set(b.image_ids)) for b in batches)
            return len(batches)

        original = dispatch.publish
        dispatch.publish = capture
        try:
            dispatch.publish_images(farm.sessions, farm.celery, farm.settings, list(ids), origin="test")
        finally:
            dispatch.publish = original
    assert priority == 7
    by_task = {task: (prio, members) for task, prio, members in sent}
    for image_id, (task_id, campaign_id) in ids.items():
        prio, members = by_task[task_id]
        assert image_id in members and prio == (7 if campaign_id else 0)
    assert len(plain.results()) == 1


def test_the_test_builders_are_what_the_request_path_makes(farm_settings: Settings, make_request, make_spec) -> None:
    """The shared builders (tests/conftest.py) stay valid: ``make_spec()`` is what the request path makes of
    ``make_request()``, image for image."""
    assert check_request(make_request(), farm_settings).images == [make_spec()]
    assert check_request(make_request(num_images=2, seed=5, steps=6), farm_settings).images == [
        make_spec(seed=5, steps=6), make_spec(seed=6, steps=6)
    ]
