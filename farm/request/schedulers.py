"""Scheduler names users may ask for, and what each one is in diffusers and in A1111's vocabulary.

Plain data, so the submitter can validate names without importing diffusers; the worker turns a
name into a scheduler with ``workers.diffusion.schedulers.make_scheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerInfo:
    name: str
    diffusers_class: str
    a1111_name: str
    options: dict = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerInfo] = {
    info.name: info
    for info in [
        SchedulerInfo("ddim", "DDIMScheduler", "DDIM"),
        SchedulerInfo("pndm", "PNDMScheduler", "PLMS"),
        SchedulerInfo("euler", "EulerDiscreteScheduler", "Euler"),
        SchedulerInfo("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
        SchedulerInfo("heun", "HeunDiscreteScheduler", "Heun"),
        SchedulerInfo("lms", "LMSDiscreteScheduler", "LMS"),
        SchedulerInfo("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M"),
        SchedulerInfo(
            "dpmpp_2m_karras",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M Karras",
            {"use_karras_sigmas": True},
        ),
        SchedulerInfo("unipc", "UniPCMultistepScheduler", "UniPC"),
    ]
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)

#: SD1.x's noise schedule, as SD1.5 ships its PNDM scheduler config (models farm builds use it too).
SD1_PNDM_CONFIG: dict = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)
