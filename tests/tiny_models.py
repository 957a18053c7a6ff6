"""A tiny random model folder with one distilled student, as the CLI, pipeline and report tests draw from."""
from __future__ import annotations

import os

import torch

from ldm.distill.student import GuidedStudent
from ldm.models.unet import UNet
from ldm.pipeline import save_index, save_random_model


def random_model_with_student(folder, steps: int = 2, *, resolution: int = 32, w_features: int = 64,
                              dtype: torch.dtype | None = None) -> str:
    """`save_random_model(folder)` plus student-`steps`, initialised from its teacher (GuidedStudent.from_teacher
    with `w_features`, saved in `dtype`), listed in the folder's index; the folder as a string."""
    folder = str(folder)
    index = save_random_model(folder, resolution=resolution)
    student = GuidedStudent.from_teacher(UNet.from_pretrained(os.path.join(folder, "unet")), w_features)
    student.save_pretrained(os.path.join(folder, f"student-{steps}"), dtype=dtype)
    index.students = {str(steps): f"student-{steps}"}
    save_index(folder, index)
    return folder
