"""Settings of ``farm api`` (``FARM_API_*``), apart from the farm's own :class:`~farm.settings.Settings`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ApiSettings"]


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FARM_API_", env_file=".env", extra="ignore")

    #: False only with ``farm api --no-auth`` (then only loopback clients are served)
    auth: bool = True
    #: a synchronous /sdapi/v1/txt2img waits this long for its images, then answers 504 with the
    #: job id (the images still render: GET /v1/jobs/{id})
    sync_timeout: float = Field(default=600.0, gt=0)
    #: seconds an idle keep-alive connection stays open (uvicorn's default is 5): longer than the
    #: idle timeout of clients' connection pools and proxies in front (60 s is common), so a client
    #: never reuses a connection the server is closing ("Server disconnected without sending a response")
    keep_alive: float = Field(default=75.0, gt=0)
    #: how often the API polls the database for finished work (one query for all waiting requests)
    poll_interval: float = Field(default=0.2, gt=0)
    #: request bodies larger than this are refused with 413 (base64 init image + mask fit easily)
    max_body_bytes: int = Field(default=80 * 1024 * 1024, ge=1024)
    #: a campaign's prompt file upload (the whole multipart body) larger than this is refused with 413
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    #: webhooks: attempts, first backoff (doubled each time, capped at 300 s), per-attempt timeout
    webhook_attempts: int = Field(default=8, ge=1)
    webhook_backoff: float = Field(default=1.0, gt=0)
    webhook_timeout: float = Field(default=10.0, gt=0)
    #: how often the webhook sender looks for finished jobs to announce
    webhook_interval: float = Field(default=1.0, gt=0)
