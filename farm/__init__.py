"""farm: a distributed render farm for Stable Diffusion v1.x.

The light side: submit and follow work from Python. No torch, no diffusers here.

    from farm import Farm
    job = Farm.from_env().submit("a red circle on a blue background", num_images=4)
"""

from farm.client import Farm, ImageResult, Submission, SubmissionStatus
from farm.errors import (
    ConfigError,
    FarmError,
    ModelLoadError,
    NotFound,
    RenderError,
    SchemaOutOfDate,
    StorageError,
    ValidationError,
    WaitTimeout,
)
from farm.settings import Limits, Settings
from farm.request.spec import GenerationRequest, ImageSpec

__all__ = [
    "ConfigError",
    "Farm",
    "FarmError",
    "GenerationRequest",
    "ImageResult",
    "ImageSpec",
    "Limits",
    "ModelLoadError",
    "NotFound",
    "RenderError",
    "SchemaOutOfDate",
    "Settings",
    "StorageError",
    "Submission",
    "SubmissionStatus",
    "ValidationError",
    "WaitTimeout",
]
