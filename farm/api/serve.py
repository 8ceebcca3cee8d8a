"""The uvicorn factory ``farm.api.serve:app``: the app from ``FARM_*`` and ``FARM_API_*``."""

from __future__ import annotations


def app():
    from farm.api.app import create_app

    return create_app()
