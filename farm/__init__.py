"""farm: a distributed render farm for Stable Diffusion v1.x.

The light side: submit and follow work from Python. No torch, no diffusers here.

    from farm import Farm
    job = Farm.from_env().submit("a red circle on a blue background", num_images=4)
"""

from farm.client import Farm, Submission, SubmissionStatus
from farm.errors import (
    ConfigError,
    FarmError,
    Incomplete,
    InputError,
    LoraError,
    MissingObject,
    ModelLoadError,
    NotFound,
    PublishError,
    RenderError,
    SchemaOutOfDate,
    StorageError,
    ValidationError,
    WaitTimeout,
)
from farm.settings import Limits, Settings
from farm.request.spec import GenerationRequest, ImageSpec
from farm.results import ImageResult

__all__ = [
    "ConfigError",
    "Farm",
    "FarmError",
    "Incomplete",
    "InputError",
    "LoraError",
    "MissingObject",
    "PublishError",
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
