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


def write_image_and_mask(folder, side: int = 32) -> tuple[str, str]:
    """A random RGB picture `folder`/in.png and an inpainting mask `folder`/mask.png (a white box at rows 8-19,
    columns 10-23), side x side, for the img2img / inpaint CLIs; their paths."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(os.path.join(folder, "in.png"))
    mask = np.zeros((side, side), np.uint8)
    mask[8:20, 10:24] = 255
    Image.fromarray(mask).save(os.path.join(folder, "mask.png"))
    return os.path.join(folder, "in.png"), os.path.join(folder, "mask.png")


def random_flow_model(folder) -> str:
    """A tiny random model folder (`save_random_model`) whose index says rectified flow, predicting the velocity."""
    import json
    save_random_model(str(folder))
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index.update(schedule={"name": "rectified_flow"}, prediction="flow")
    with open(index_path, "w") as f:
        json.dump(index, f)
    return str(folder)
