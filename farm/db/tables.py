"""Database records: submissions and their per-image results (SQLAlchemy 2, PostgreSQL or SQLite)."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC timestamp on every backend (SQLite keeps none, so it is added back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use datetime.now(timezone.utc)")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Status(str, enum.Enum):
    queued = "queued"
    paused = "paused"  # held back with its campaign; queued again on resume
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    #: rendered, then withheld by the safety checker (policy ``drop``): no PNG stored, left out of exports
    filtered = "filtered"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({Status.succeeded, Status.failed, Status.canceled, Status.filtered})

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class CampaignState(str, enum.Enum):
    active = "active"
    paused = "paused"
    canceled = "canceled"


class CampaignRecord(Base):
    """A named, resumable group of many images (a dataset being synthesised)."""

    __tablename__ = "campaigns"
    __table_args__ = (
        CheckConstraint("state IN ('active', 'paused', 'canceled')", name="state_valid"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default=CampaignState.active.value)
    #: Celery priority of its tasks: 0 is served first (interactive jobs), 9 last.
    priority: Mapped[int] = mapped_column(Integer, default=6)


class LoraRecord(Base):
    """A registered LoRA: a name for a safetensors file stored once under its sha256."""

    __tablename__ = "loras"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16))  # diffusers | kohya
    base: Mapped[str] = mapped_column(String(128))  # the architecture it fits: sd1, or a model's name
    layers: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EmbeddingRecord(Base):
    """A registered textual-inversion embedding: a name (its token in prompts) for a safetensors file."""

    __tablename__ = "embeddings"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16))  # a1111 (emb_params / string_to_param) | diffusers
    #: how many token vectors it stands for in a prompt
    vectors: Mapped[int] = mapped_column(Integer)
    #: the width of each vector: 768 for SD1.x's CLIP ViT-L/14
    width: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SubmissionRecord(Base):
    """One call of ``submit``/``submit_many``: a group of images the user follows together."""

    __tablename__ = "submissions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    num_images: Mapped[int] = mapped_column(Integer)
    num_requests: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(255))
    campaign_id: Mapped[str | None] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), index=True)
    #: When all its task messages reached the broker (NULL: recorded, not yet fully published).
    published_at: Mapped[datetime | None]

    images: Mapped[list["ImageRecord"]] = relationship(
        back_populates="submission", order_by="ImageRecord.position", cascade="all, delete-orphan"
    )


class ImageRecord(Base):
    """One image: its resolved parameters, where it is in its life, and where its PNG lives."""

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'paused', 'running', 'succeeded', 'failed', 'canceled', 'filtered')",
            name="status_valid",
        ),
        Index("ix_images_submission_position", "submission_id", "position", unique=True),
        Index("ix_images_campaign_item", "campaign_id", "item_key", unique=True),
        Index("ix_images_campaign_status", "campaign_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    submission_id: Mapped[str] = mapped_column(ForeignKey("submissions.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    request_index: Mapped[int] = mapped_column(Integer)
    campaign_id: Mapped[str | None] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    #: Stable identity of the image inside its campaign (row id × sweep values × index): re-submitting
    #: the same file finds it and adds nothing.
    item_key: Mapped[str | None] = mapped_column(String(64))

    # what to render
    model: Mapped[str] = mapped_column(String(128))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    scheduler: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)

    # where it is
    status: Mapped[str] = mapped_column(String(16), default=Status.queued.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Denoising steps its worker has done so far while running (progress by steps)
    steps_done: Mapped[int | None] = mapped_column(Integer)
    task_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(255))
    claim_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None]
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The outbox mark: set (to when it is due) in the same transaction that queues the image again;
    #: cleared once its message reached the broker. The reconciler publishes what stays due.
    publish_after: Mapped[datetime | None] = mapped_column(index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    # what came of it
    gpu_seconds: Mapped[float | None] = mapped_column(Float)
    storage_key: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    prompt_truncated: Mapped[bool | None]
    model_path: Mapped[str | None] = mapped_column(Text)
    info: Mapped[dict[str, Any] | None]
    #: the safety checker's verdict (NULL: not checked, policy ``off``)
    flagged: Mapped[bool | None]
    #: the checker's scores and the policy applied: {"policy": ..., "checker": ..., "scores": {...}}
    safety: Mapped[dict[str, Any] | None]

    submission: Mapped[SubmissionRecord] = relationship(back_populates="images")


class LeaseRecord(Base):
    """A named leader lease (the reconciler's): one holder at a time, renewed while it lives."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime]


# -- the HTTP API (farm.api): keys and who owns which submission ---------------------------------


class ApiKeyRecord(Base):
    """An API key of ``farm api``: only its sha256 is kept (the key is shown once, at creation)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    #: sha256 (hex) of the key; the key itself is never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: the key's first characters, to tell keys apart in listings (not enough to use it)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    #: requests per second (token bucket, burst = max(1, rate)); NULL: unlimited
    rate: Mapped[float | None] = mapped_column(Float)
    #: unfinished jobs at once; NULL: unlimited
    concurrency: Mapped[int | None] = mapped_column(Integer)
    #: HMAC-SHA256 secret that signs this key's webhooks (the server must sign, so it is kept)
    webhook_secret: Mapped[str] = mapped_column(String(64))
    #: the caller's A1111 options (POST /sdapi/v1/options): sd_model_checkpoint, CLIP_stop_at_last_layers
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiJobRecord(Base):
    """A submission made through ``farm api``: whose it is, and its webhook's delivery state."""

    __tablename__ = "api_jobs"

    submission_id: Mapped[str] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), primary_key=True
    )
    #: NULL: made without a key (``farm api --no-auth``, loopback only)
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    #: txt2img | img2img | job
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: what the A1111 answer needs besides the images (the request as the caller gave it, trimmed)
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    callback_url: Mapped[str | None] = mapped_column(Text)
    #: pending | delivered | failed (NULL: no webhook)
    webhook_state: Mapped[str | None] = mapped_column(String(16), index=True)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_next_at: Mapped[datetime | None]
    webhook_error: Mapped[str | None] = mapped_column(Text)


class ApiCampaignRecord(Base):
    """A campaign made through ``farm api``: whose it is (other keys get 404)."""

    __tablename__ = "api_campaigns"

    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# -- training (farm train lora): one row per training job ----------------------------------------


class TrainingState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


class TrainingJobRecord(Base):
    """A LoRA training job: what to train on, where it is (claims and leases as for images), what came of it."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')", name="state_valid"
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: the LoRA's name once registered
    name: Mapped[str] = mapped_column(String(128), unique=True)
    model: Mapped[str] = mapped_column(String(128))
    #: the dataset as given: a campaign name, an imagefolder directory or a storage URI
    data: Mapped[str] = mapped_column(Text)
    #: rank, steps, lr, batch_size, resolution, text_encoder, checkpoint_every, sample_every, seed, ...
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default=TrainingState.queued.value, index=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    #: the last checkpoint in storage (safetensors + JSON) and the step it holds
    checkpoint_key: Mapped[str | None] = mapped_column(String(1024))
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(255))
    claim_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None]
    #: the outbox mark, as for images: set when queued, cleared once its message reached the broker
    publish_after: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    #: what came of it: sample image keys per step, timings, the registered LoRA's sha256
    info: Mapped[dict[str, Any] | None]
