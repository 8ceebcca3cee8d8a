"""One typed Settings object, built at an entrypoint and passed down.

Every value can come from a ``FARM_*`` environment variable (or a ``.env`` file); nothing else in
the code reads the environment. boto3 still reads its own variables (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL_S3``…), as it does everywhere.

With no ``FARM_*`` variable set, everything is embedded under one local data folder: SQLite, a
filesystem broker and ``file://`` storage, so ``farm worker --cpu`` in one shell and ``farm submit``
in another work together with no server.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from farm.errors import ConfigError

__all__ = [
    "BUILTIN_SHAPES", "BUILTIN_TINY", "SAFETY_POLICIES", "Limits", "Settings", "parse_batch_sizes", "parse_sizes", "redact",
    "shipped_model",
]

#: A tiny random SD-architecture pipeline, built on first use into ``<data_dir>/models/tiny``.
BUILTIN_TINY = "builtin:tiny"
#: The small trained shapes model shipped with farm (models/shapes; docs/shapes-model.md): the
#: default model, so the embedded farm draws what it is asked ("a red circle on a blue background").
BUILTIN_SHAPES = "builtin:shapes"


#: What the safety checker does with an image, least strict first (a request may only ask for a
#: policy at least as strict as FARM_SAFETY): ``off`` (not checked), ``flag`` (checked, the verdict
#: recorded), ``blur`` (a flagged image is stored blurred), ``drop`` (a flagged image is not stored:
#: status ``filtered``).
SAFETY_POLICIES = ("off", "flag", "blur", "drop")
SafetyPolicy = Literal["off", "flag", "blur", "drop"]

#: ``scheme://user:password@`` (the password up to the last ``@`` of the address, so a password
#: holding an unescaped ``@`` is hidden whole), and ``password=…`` in a query string (libpq takes it).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*):(?P<secret>[^\s'\"]*)@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|secret|token|access_key|secret_key)=)[^&;\s'\"]*", re.I)
#: Database columns a model name is stored in (``images.model``, ``loras.base``: varchar(128)).
MODEL_NAME_MAX_CHARS = 128


def redact(text: str) -> str:
    """``text`` with every URL password replaced by ``***`` (``postgresql://farm:***@db/farm``).

    Applied wherever a URL may be shown: configuration errors, the CLI's error line, ``repr`` of the
    settings. Database, Redis and S3-style URLs alike; text without a URL comes back unchanged.
    """
    if "://" not in text and "=" not in text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}***", text)


def shipped_model(name: str) -> Path:
    """Where a model shipped with farm lies: inside the installed package, or in the checkout."""
    packaged = Path(__file__).parent / "_models" / name
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "models" / name


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"512x512, 768x512"`` → ``[(512, 512), (768, 512)]``; ValueError naming the bad part."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        width, sep, height = part.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            raise ValueError(f"{part!r} is not WIDTHxHEIGHT (e.g. '512x512,768x512')")
        sizes.append((int(width), int(height)))
    return sizes


def parse_batch_sizes(text: str) -> dict[tuple[int, int], int]:
    """``"512x512=16, 768x768=6"`` → ``{(512, 512): 16, (768, 768): 6}``; ValueError naming the bad part."""
    batches: dict[tuple[int, int], int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        size, sep, batch = part.partition("=")
        if not (sep and batch.strip().isdigit() and int(batch) > 0):
            raise ValueError(f"{part!r} is not WIDTHxHEIGHT=BATCH (e.g. '512x512=16,768x768=6')")
        [(width, height)] = parse_sizes(size) or [(0, 0)]
        batches[(width, height)] = int(batch)
    return batches


def _describe(exc: pydantic.ValidationError) -> str:
    """``bad setting FARM_X: what is wrong`` for the first error (the value shown unless it may hold a secret)."""
    first = exc.errors()[0]
    variable = "FARM_" + "__".join(str(p) for p in first["loc"]).upper()
    message = redact(first["msg"].removeprefix("Value error, "))
    value = first.get("input")
    secret = any(word in variable for word in ("URL", "KEY", "SECRET", "PASSWORD", "TOKEN"))
    if secret or isinstance(value, (dict, list)) or value is None:
        shown = ""
    else:
        text = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80]) + "…"
        shown = f" (given {text})"
    return f"bad setting {variable}: {message}{shown}"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "farm"


class Limits(BaseModel):
    """Bounds a request is checked against at submit (``FARM_LIMITS__MAX_STEPS=…``)."""

    model_config = ConfigDict(extra="forbid")

    min_size: int = 64
    max_size: int = 2048
    max_pixels: int = 1024 * 1024 * 2
    min_steps: int = 1
    max_steps: int = 150
    min_guidance_scale: float = 0.0
    max_guidance_scale: float = 30.0
    max_num_images: int = 256
    max_prompt_chars: int = 4000
    max_requests_per_submission: int = 100_000
    #: Input images (img2img, inpainting): bytes, pixels (checked from the header, before
    #: decoding; Pillow's own decompression-bomb guard stays on above it) and smallest side.
    max_input_bytes: int = 25 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096
    min_input_side: int = 16
    #: LoRA files accepted at registration.
    max_lora_bytes: int = 512 * 1024 * 1024
    #: A campaign's input × sweeps may not expand past this many images.
    max_campaign_images: int = 5_000_000

    @model_validator(mode="after")
    def _consistent(self) -> "Limits":
        for name, value in self:
            if isinstance(value, (int, float)) and not (value >= 0 and value < float("inf")):
                raise ValueError(f"{name}={value!r} must be a finite number, 0 or more")
        for low, high in (("min_size", "max_size"), ("min_steps", "max_steps"), ("min_guidance_scale", "max_guidance_scale")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low}={getattr(self, low)} is above {high}={getattr(self, high)}")
        if self.min_size < 8 or self.min_size % 8 or self.max_size % 8:
            raise ValueError(f"min_size={self.min_size} and max_size={self.max_size} must be multiples of 8, at least 8")
        for name in ("min_steps", "max_num_images", "max_requests_per_submission", "max_campaign_images", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        return self


class Settings(BaseSettings):
    """Everything the farm needs to know, read from ``FARM_*`` variables."""

    model_config = SettingsConfigDict(
        env_prefix="FARM_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    #: Local folder for the embedded defaults (SQLite file, broker folder, images, built models).
    data_dir: Path = Field(default_factory=_default_data_dir)
    #: SQLAlchemy URL. Default: ``sqlite:///<data_dir>/farm.db``. Production: ``postgresql+psycopg://…``.
    database_url: str | None = None
    #: Celery broker. Default: kombu's filesystem transport under ``<data_dir>/broker``.
    broker_url: str | None = None
    #: Where PNGs go: ``s3://bucket/prefix`` or ``file:///dir``. Default: ``file://<data_dir>/images``.
    storage_url: str | None = None
    #: ``name=location`` pairs, comma separated: a diffusers folder, a hub id, or ``builtin:tiny``.
    models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"shapes": BUILTIN_SHAPES, "tiny": BUILTIN_TINY}
    )
    #: Default: ``shapes`` when configured, else the first of FARM_MODELS.
    default_model: str | None = None
    #: Images that share model, size, steps, scheduler and guidance go to a GPU in batches of at most this.
    max_batch_size: int = Field(default=8, ge=1, le=256)
    #: Render defaults of a request that gives none and whose model's ``farm.json`` gives none
    #: (a request's value wins, then the model's farm.json, then these; see ``farm.catalogue``).
    default_scheduler: str = "dpmpp_2m"
    default_steps: int = Field(default=25, ge=1)
    default_guidance_scale: float = Field(default=7.5, ge=0)
    default_size: int = Field(default=512, ge=8, multiple_of=8)
    #: Campaign images written and published per transaction.
    campaign_chunk_size: int = Field(default=5000, ge=1)
    #: Celery priority of campaign tasks unless a campaign sets its own (0 first … 9 last; plain
    #: submissions use 0, so a small interactive job is not stuck behind a big campaign).
    campaign_priority: int = Field(default=6, ge=0, le=9)
    #: Prefix of the per-model Celery queues (``<prefix>.<model>``).
    queue_prefix: str = "farm"

    # -- delivery -------------------------------------------------------------------------------
    #: Redis visibility timeout: keep it well above the longest task.
    visibility_timeout: int = Field(default=6 * 3600, ge=60)
    #: A worker's claim on its images expires this long after its last heartbeat; then another
    #: delivery of the same task may take them over (a worker that died mid-render).
    claim_lease_seconds: float = Field(default=60.0, gt=0)
    #: Hard time limit of one render task, in seconds (enforced by the prefork pool).
    task_time_limit: int = Field(default=3 * 3600, ge=10)
    #: A task whose claim hit a database error is retried this many times (backoff 2, 4… 60 s).
    max_retries: int = Field(default=5, ge=0)
    #: Claims of an image whose worker vanished mid-render (killed, out of memory) before it is failed
    #: for good; infrastructure faults (database, broker or storage away, a warm shutdown) never count.
    max_attempts: int = Field(default=5, ge=1)
    #: Infrastructure errors (database, broker away) are retried with capped, jittered backoff for
    #: this long before a task hands its message back; they never fail an image.
    infra_deadline_seconds: float = Field(default=900.0, gt=0)
    #: On SIGTERM a render process finishes its chunk if it can within this many seconds; else it
    #: stops and hands its images back at once (claim released, no attempt counted).
    shutdown_seconds: float = Field(default=30.0, ge=0)

    # -- Flower (`farm flower`) ----------------------------------------------------------------------
    #: ``user:password`` Flower asks for (its pages and API); `farm flower` refuses to start without
    #: it unless given --insecure.
    flower_basic_auth: SecretStr | None = None
    flower_address: str = "127.0.0.1"
    flower_port: int = Field(default=5555, ge=1, le=65535)

    # -- metrics (Prometheus) ---------------------------------------------------------------------
    #: Port where `farm worker` serves its processes' metrics (workers.metrics); None: off.
    worker_metrics_port: int | None = Field(default=9809, ge=1, le=65535)
    #: Address those metrics listen on (0.0.0.0 so Prometheus on another host can scrape).
    worker_metrics_host: str = "0.0.0.0"

    # -- the reconciler (farm.reconciler: run by `farm worker`, and as `farm reconcile`) -------------
    #: Seconds between rounds (sweep expired leases, publish what was recorded and never published,
    #: republish queued images whose message the broker lost).
    reconcile_interval: float = Field(default=10.0, gt=0)
    #: Work recorded this long ago and still unpublished is published by the reconciler (its
    #: submitter died, or the broker refused).
    reconcile_grace_seconds: float = Field(default=15.0, ge=0)
    #: Seconds between full checks of the broker's queues against the database (at once when the
    #: broker's marker shows it restarted empty).
    reconcile_deep_seconds: float = Field(default=300.0, gt=0)

    #: CPU threads torch may use in a worker process (default: torch's own choice). Set it when
    #: several CPU workers share a machine, e.g. cores / processes.
    torch_threads: int | None = Field(default=None, ge=1)

    # -- render speed (workers.diffusion.speed); None = on for CUDA, off on CPU --------------------------
    render_channels_last: bool | None = None
    #: fused q/k/v projections; a worker unfuses before its first LoRA (fusion drops LoRA weights)
    render_fuse_qkv: bool | None = None
    #: VAE decodes a batch one image at a time: lower peak memory, same pixels
    render_vae_slicing: bool | None = None
    #: torch.compile the UNet and VAE decoder, compiling ``render_warmup_sizes`` at worker start
    render_compile: bool = False
    render_compile_mode: str | None = None
    render_warmup_sizes: str = "512x512"
    #: Images rendered at once per size, ``"512x512=16,768x768=6"`` (workers.diffusion.batching); sizes not
    #: named render a task's images all at once, halved and remembered on out-of-memory.
    render_batch_sizes: str = ""
    #: Measure the best batch per warm-up size at worker start (cached per GPU, model and torch
    #: version); None = on for CUDA. Sizes in ``render_batch_sizes`` are not measured.
    render_calibrate: bool | None = None

    # -- finishing images (workers.finishing.finisher) ----------------------------------------------------
    #: Threads that PNG-encode and upload rendered images.
    upload_threads: int = Field(default=4, ge=1, le=64)
    #: A failed upload is tried again this many times (backoff 1, 2, 4… s) before its images are
    #: queued again.
    upload_retries: int = Field(default=3, ge=0)
    #: Chunks whose uploads may still run while the GPU renders the next ones; past it, the render
    #: waits (memory stays bounded when storage is slow).
    upload_max_pending: int = Field(default=2, ge=1)
    #: A task returns (and is acked) once its images are handed to the uploader, so the next task
    #: renders while they upload; the images stay claimed, leases renewed, until each is recorded.
    #: False: a task returns only after its images are recorded.
    render_overlap_tasks: bool = True
    #: Cross-job batching: a worker tops its claim up, in the same transaction, with queued images of
    #: other tasks that share the batch key (highest priority, then oldest, first), up to its chunk
    #: size for that resolution, so single-image jobs share GPU batches. False: a task renders only
    #: its own images.
    top_up: bool = True
    #: Per-worker cache of text-encoder outputs (by encoder state, prompt text, clip skip and
    #: embedding set), least recently used dropped past this many bytes; 0: off. 64 MiB holds about
    #: 550 SD1.x 77-token windows in fp16.
    prompt_cache_bytes: int = Field(default=64 * 1024**2, ge=0)

    # -- LoRA ---------------------------------------------------------------------------------
    #: Worker disk cache of LoRA files: total size, and free disk space it always leaves.
    lora_cache_bytes: int = Field(default=20 * 1024**3, ge=0)
    lora_min_free_bytes: int = Field(default=5 * 1024**3, ge=0)
    #: Adapters a worker keeps loaded in its pipeline (least recently used unloaded past it).
    lora_max_loaded: int = Field(default=8, ge=1)
    #: A LoRA batch goes to a warm worker's own queue while fewer than this many tasks wait there.
    affinity_max_backlog: int = Field(default=2, ge=1)
    #: Seconds a worker's advert of its loaded adapters lives in Redis without renewal (each worker
    #: process renews it every third of this while it lives, so a killed worker's lapses this fast).
    advert_ttl: int = Field(default=30, ge=5)

    # -- storage --------------------------------------------------------------------------------
    #: S3 endpoint for MinIO/R2/moto; boto3 also honours ``AWS_ENDPOINT_URL_S3``.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    #: Attempts per S3 call, the first included (refused, reset, timed out, 5xx, throttled); then the
    #: image waits in the worker's spool.
    s3_max_attempts: int = Field(default=5, ge=1)
    #: Seconds to connect to / wait for an answer from S3 on one attempt (a hung server fails fast).
    s3_connect_timeout: float = Field(default=5.0, gt=0)
    s3_read_timeout: float = Field(default=30.0, gt=0)
    #: A rendered image waiting for storage is retried for this long (from the local spool) before
    #: the worker gives it back; storage outages never fail an image.
    upload_deadline_seconds: float = Field(default=3600.0, gt=0)
    #: Bytes of rendered PNGs a worker keeps in its local spool while storage is away; past it the
    #: worker stops taking tasks until storage answers.
    spool_bytes: int = Field(default=2 * 1024**3, ge=1024 * 1024)
    #: Longest pause between two probes of a storage that is away (also the longest a worker takes
    #: to notice it answers again).
    spool_retry_max_seconds: float = Field(default=30.0, gt=0)

    # -- safety (workers.finishing.safety) ---------------------------------------------------------
    #: Folder of diffusers' StableDiffusionSafetyChecker (config.json + model.safetensors, optionally
    #: preprocessor_config.json), on the workers; set it on the submitters too: without it a request
    #: asking for flag, blur or drop is refused at submit.
    safety_checker: Path | None = None
    #: The farm's safety policy (one of SAFETY_POLICIES): what a request that names none gets, and
    #: the least strict one a request may ask for.
    safety: SafetyPolicy = "off"

    limits: Limits = Field(default_factory=Limits)

    def __init__(self, **values: object):
        # One translation for every entrypoint: a bad FARM_* value is a ConfigError naming the
        # variable (never the value of a URL, which may hold a password).
        try:
            super().__init__(**values)
        except pydantic.ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
        except (ValueError, TypeError, OSError) as exc:  # a .env file or value pydantic-settings trips on
            text = redact(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            named = re.search(r'field "(\w+)"', text)
            if named is None:
                raise ConfigError(f"bad settings: {text}") from None
            variable = f"FARM_{named[1].upper()}"
            raise ConfigError(
                f"bad setting {variable}: {text} (a nested setting is JSON, e.g. {variable}='{{\"key\": 1}}', "
                f"or one value at a time, e.g. {variable}__KEY=1)"
            ) from None

    def __repr_args__(self):
        # repr(settings) / str(settings) show URLs without their passwords
        for name, value in super().__repr_args__():
            yield name, redact(value) if isinstance(value, str) and name else value

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, value: Path) -> Path:
        text = str(value)
        if "\x00" in text:
            raise ValueError("must not contain NUL characters")
        try:
            os.fsencode(text)
        except UnicodeEncodeError:
            raise ValueError("is not a path this system can encode") from None
        return value

    @field_validator("default_scheduler")
    @classmethod
    def _check_default_scheduler(cls, value: str) -> str:
        from farm.request.schedulers import SCHEDULER_NAMES

        if value not in SCHEDULER_NAMES:
            raise ValueError(f"{value!r} is not a scheduler; valid names: {', '.join(SCHEDULER_NAMES)}")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        if isinstance(value, str):
            pairs: dict[str, str] = {}
            for item in filter(None, (part.strip() for part in value.split(","))):
                name, sep, location = item.partition("=")
                if not sep or not name.strip() or not location.strip():
                    raise ValueError(
                        f"FARM_MODELS item {item!r} is not name=location "
                        "(e.g. 'tiny=builtin:tiny,sd15=/models/sd15')"
                    )
                pairs[name.strip()] = location.strip()
            value = pairs
        if isinstance(value, dict):
            for name in value:
                if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or len(name) > MODEL_NAME_MAX_CHARS:
                    raise ValueError(
                        f"model name {name!r} must be 1 to {MODEL_NAME_MAX_CHARS} letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit"
                    )
        return value

    @field_validator("render_warmup_sizes")
    @classmethod
    def _check_warmup_sizes(cls, value: str) -> str:
        parse_sizes(value)
        return value

    @field_validator("render_batch_sizes")
    @classmethod
    def _check_batch_sizes(cls, value: str) -> str:
        parse_batch_sizes(value)
        return value

    @field_validator("default_model")
    @classmethod
    def _check_default_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        models = info.data.get("models") or {}
        if value is None:
            if not models:
                raise ValueError("FARM_MODELS names no model")
            return "shapes" if "shapes" in models else next(iter(models))
        if value not in models:
            raise ValueError(f"FARM_DEFAULT_MODEL={value!r} is not one of FARM_MODELS ({', '.join(sorted(models))})")
        return value

    @field_validator("safety")
    @classmethod
    def _check_safety(cls, value: str, info: ValidationInfo) -> str:
        if value != "off" and info.data.get("safety_checker") is None:
            raise ValueError(
                f"{value!r} needs a safety checker: set FARM_SAFETY_CHECKER to the folder of diffusers' "
                "StableDiffusionSafetyChecker (config.json + model.safetensors)"
            )
        return value

    # -- derived values -------------------------------------------------------------------------
    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'farm.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def storage(self) -> str:
        return self.storage_url or (self.data_dir / "images").resolve().as_uri()

    @property
    def warmup_sizes(self) -> list[tuple[int, int]]:
        return parse_sizes(self.render_warmup_sizes)

    @property
    def batch_sizes(self) -> dict[tuple[int, int], int]:
        return parse_batch_sizes(self.render_batch_sizes)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def queue_for(self, model: str) -> str:
        return f"{self.queue_prefix}.{model}"
