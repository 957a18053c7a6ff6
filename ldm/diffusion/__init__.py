"""Diffusion core: schedules -> parameterizations -> losses -> samplers, with CFG as a model wrapper."""
from .guidance import cfg
from .losses import DiffusionLoss, loss_weight, sample_times
from .param import Denoiser, q_sample, to_x0
from .samplers import SAMPLERS, initial_noise
from .schedules import CLEAN, Schedule, make_schedule, schedule_from_config

__all__ = ["CLEAN", "SAMPLERS", "DiffusionLoss", "Denoiser", "Schedule", "cfg", "initial_noise", "loss_weight",
           "make_schedule", "q_sample", "sample_times", "schedule_from_config", "to_x0"]
