"""``farm api``: an AUTOMATIC1111-compatible HTTP API in front of the farm (docs/api.md).

``create_app(settings)`` builds the FastAPI app; ``farm api`` serves it with uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app"]

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(settings: Any = None, api_settings: Any = None, *, farm: Any = None) -> "FastAPI":
    from farm.api.app import create_app as make

    return make(settings, api_settings, farm=farm)
