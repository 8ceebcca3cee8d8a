"""The ``farm`` command (:func:`main`); its groups live in the modules beside it."""

from farm.cli.main import main

__all__ = ["main"]
