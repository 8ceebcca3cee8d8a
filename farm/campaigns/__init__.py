"""Campaigns: many images from a prompt file × sweeps, resumable, controllable, exported as datasets.

:class:`Campaign` (``farm.campaign(name)``) submits (:mod:`farm.campaigns.submit`) and is steered
and read back (:mod:`farm.campaigns.control`); prompt files and sweeps are read by
:mod:`farm.campaigns.prompt_files`, datasets written by :mod:`farm.campaigns.export`.
"""

from farm.campaigns.control import CampaignControl, CampaignStatus
from farm.campaigns.submit import Campaign, SubmitReport

__all__ = ["Campaign", "CampaignControl", "CampaignStatus", "SubmitReport"]
