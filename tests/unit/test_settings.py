"""Settings from FARM_* variables: model list parsing, default model check, embedded defaults, limits."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest
from sqlalchemy.engine import make_url

from farm.settings import BUILTIN_SHAPES, shipped_model, BUILTIN_TINY, Limits, Settings
from farm.request.spec import check_request
from farm.errors import ConfigError, ValidationError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FARM_* variable and no .env file from the host leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("FARM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_models_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_MODELS", "tiny=builtin:tiny,sd15=/models/sd15")
    settings = Settings(data_dir=tmp_path)
    assert settings.models == {"tiny": "builtin:tiny", "sd15": "/models/sd15"}


def test_models_spaces_and_trailing_comma_are_tolerated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_MODELS", " tiny = builtin:tiny , sd15=/models/sd15 ,")
    assert Settings(data_dir=tmp_path).models == {"tiny": "builtin:tiny", "sd15": "/models/sd15"}


def test_model_location_may_contain_equals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_MODELS", "tiny=builtin:tiny,remote=s3://bucket/sd15?version=2")
    assert Settings(data_dir=tmp_path).models["remote"] == "s3://bucket/sd15?version=2"


def test_default_models_are_the_shipped_shapes_model_and_the_tiny_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.models == {"shapes": BUILTIN_SHAPES, "tiny": BUILTIN_TINY}
    assert settings.default_model == "shapes"
    assert (shipped_model("shapes") / "model_index.json").is_file()


@pytest.mark.parametrize("bad_item", ["sd15", "=/models/sd15", "sd15=", " = "])
def test_malformed_models_item_names_the_item(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad_item: str) -> None:
    monkeypatch.setenv("FARM_MODELS", f"tiny=builtin:tiny,{bad_item}")
    with pytest.raises(ConfigError) as caught:
        Settings(data_dir=tmp_path)
    message = str(caught.value)
    assert repr(bad_item.strip()) in message
    assert "name=location" in message


def test_default_model_must_be_one_of_the_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_MODELS", "tiny=builtin:tiny,sd15=/models/sd15")
    monkeypatch.setenv("FARM_DEFAULT_MODEL", "sd21")
    with pytest.raises(ConfigError) as caught:
        Settings(data_dir=tmp_path)
    message = str(caught.value)
    assert "FARM_DEFAULT_MODEL='sd21'" in message
    assert "sd15, tiny" in message


def test_default_model_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_MODELS", "tiny=builtin:tiny,sd15=/models/sd15")
    monkeypatch.setenv("FARM_DEFAULT_MODEL", "sd15")
    settings = Settings(data_dir=tmp_path)
    assert settings.default_model == "sd15"
    assert check_request({"prompt": "x"}, settings).images[0].model == "sd15"


def test_the_default_model_is_the_first_configured_one_unless_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_MODELS", "sd15=/models/sd15,sd14=/models/sd14")
    assert Settings(data_dir=tmp_path).default_model == "sd15"
    monkeypatch.setenv("FARM_DEFAULT_MODEL", "sd14")
    assert Settings(data_dir=tmp_path).default_model == "sd14"
    monkeypatch.setenv("FARM_DEFAULT_MODEL", "tiny")
    with pytest.raises(ConfigError, match="FARM_DEFAULT_MODEL='tiny' is not one of FARM_MODELS"):
        Settings(data_dir=tmp_path)


def test_embedded_defaults_live_under_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "farm data"
    settings = Settings(data_dir=data_dir)

    url = make_url(settings.database)
    assert url.get_backend_name() == "sqlite"
    assert Path(url.database) == data_dir / "farm.db"

    assert settings.storage.startswith("file://")
    assert Path(url2pathname(urlsplit(settings.storage).path)) == (data_dir / "images").resolve()

    assert settings.broker == "filesystem://"
    assert settings.broker_folder == data_dir / "broker"
    assert settings.models_dir == data_dir / "models"


def test_data_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_DATA_DIR", str(tmp_path / "d"))
    settings = Settings()
    assert settings.data_dir == tmp_path / "d"
    assert Path(make_url(settings.database).database) == tmp_path / "d" / "farm.db"
    assert settings.broker_folder == tmp_path / "d" / "broker"


def test_explicit_urls_win_over_embedded_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_DATABASE_URL", "postgresql+psycopg://farm@db/farm")
    monkeypatch.setenv("FARM_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("FARM_STORAGE_URL", "s3://renders/farm")
    settings = Settings(data_dir=tmp_path)
    assert settings.database == "postgresql+psycopg://farm@db/farm"
    assert settings.broker == "redis://redis:6379/0"
    assert settings.storage == "s3://renders/farm"


def test_nested_limits_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_LIMITS__MAX_STEPS", "10")
    settings = Settings(data_dir=tmp_path)
    assert settings.limits.max_steps == 10
    assert settings.limits.max_size == Limits().max_size  # the others keep their defaults
    check_request({"prompt": "x", "steps": 10}, settings)
    with pytest.raises(ValidationError, match="between 1 and 10"):
        check_request({"prompt": "x", "steps": 11}, settings)


def test_unknown_limit_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A typo in a limit's name is an error, not silently ignored."""
    monkeypatch.setenv("FARM_LIMITS__MAX_STEP", "10")
    with pytest.raises(ConfigError, match="FARM_LIMITS__MAX_STEP\\b"):
        Settings(data_dir=tmp_path)


def test_bad_limit_value_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_LIMITS__MAX_STEPS", "many")
    with pytest.raises(ConfigError, match="FARM_LIMITS__MAX_STEPS"):
        Settings(data_dir=tmp_path)


@pytest.mark.parametrize("with_farm_limit", [False, True], ids=["defaults", "with-FARM_LIMITS__MAX_PIXELS"])
def test_unprefixed_variables_do_not_change_limits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, with_farm_limit: bool
) -> None:
    """Only FARM_* variables configure the farm: an unrelated MAX_STEPS in the shell changes nothing."""
    monkeypatch.setenv("MAX_STEPS", "5")
    monkeypatch.setenv("MIN_SIZE", "1024")
    if with_farm_limit:
        monkeypatch.setenv("FARM_LIMITS__MAX_PIXELS", "1000000")
    settings = Settings(data_dir=tmp_path)
    assert settings.limits.max_steps == 150
    assert settings.limits.min_size == 64
    assert settings.limits.max_pixels == (1_000_000 if with_farm_limit else Limits().max_pixels)


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("FARM_DEFAULT_SCHEDULER=euler\nFARM_MAX_BATCH_SIZE=3\n")
    settings = Settings(data_dir=tmp_path)
    assert settings.default_scheduler == "euler"
    assert settings.max_batch_size == 3


@pytest.mark.parametrize("value", ["0", "257"])
def test_max_batch_size_bounds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    monkeypatch.setenv("FARM_MAX_BATCH_SIZE", value)
    with pytest.raises(ConfigError, match="FARM_MAX_BATCH_SIZE"):
        Settings(data_dir=tmp_path)


def test_queue_per_model(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, queue_prefix="render")
    assert settings.queue_for("sd15") == "render.sd15"
