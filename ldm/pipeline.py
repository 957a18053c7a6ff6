"""A text-to-image model folder on disk, and sampling from it with the teacher or a student.

Layout (every part is config.json + model.safetensors):

    <model>/model_index.json    what is where, and the diffusion settings (`ModelIndex`)
    <model>/autoencoder/        stage 1: KL autoencoder (latent scaling factor in its config)
    <model>/text_encoder/       stage 2: text encoder (scratch weights, or a config naming CLIP)
    <model>/unet/               stage 2: the CFG teacher
    <model>/student-8/ ...      stage 3: guided students distilled to 8, 4, 2, 1 steps

The teacher samples with DDIM (or any core sampler) and classifier-free guidance, two
network evaluations per step; a student takes w as an input, one evaluation per step.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch

from ldm.diffusion.guidance import cfg
from ldm.diffusion.param import Denoiser
from ldm.diffusion.samplers import SAMPLERS, initial_noise
from ldm.diffusion.schedules import schedule_from_config
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text import ScratchTextEncoder, TextEncoderConfig, build_text_encoder
from ldm.models.unet import UNet

INDEX_NAME = "model_index.json"
DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "shapes64")


@dataclass
class ModelIndex:
    autoencoder: str = "autoencoder"        # sub-folders of the parts
    text_encoder: str = "text_encoder"
    unet: str = "unet"
    schedule: dict = field(default_factory=lambda: {"name": "cosine_logsnr"})
    prediction: str = "v"                   # what the teacher's U-Net predicts: eps | x0 | v
    time_scale: float = 1000.0              # the U-Net sees t * time_scale (continuous t in [0, 1])
    resolution: int = 64                    # image side in pixels
    guidance: float = 2.0                   # default w (Imagen convention: (1 + w) cond - w uncond)
    students: dict = field(default_factory=dict)   # "4" -> "student-4": distilled to that many steps
    student_prediction: str = "v"           # what the students' U-Nets predict

    @classmethod
    def from_dict(cls, d: dict) -> "ModelIndex":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{INDEX_NAME}: unknown keys {unknown}")
        return cls(**d)


def load_index(folder: str) -> ModelIndex:
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a model folder: {path} is missing")
    with open(path) as f:
        return ModelIndex.from_dict(json.load(f))


def save_index(folder: str, index: ModelIndex) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(dataclasses.asdict(index), f, indent=2)


def load_text_encoder(folder: str):
    """A scratch encoder with its weights, or a frozen CLIP/OpenCLIP one named by its config."""
    with open(os.path.join(folder, "config.json")) as f:
        tcfg = TextEncoderConfig.from_dict(json.load(f))
    return ScratchTextEncoder.from_pretrained(folder) if tcfg.kind == "scratch" else build_text_encoder(tcfg)


class TextToImage:
    """The parts of a model folder, with `generate` for the teacher and the students."""

    def __init__(self, autoencoder: AutoencoderKL, text_encoder, unet: UNet, index: ModelIndex,
                 folder: str | None = None):
        self.autoencoder, self.text_encoder, self.unet = autoencoder.eval(), text_encoder.eval(), unet.eval()
        self.index, self.folder = index, folder
        self.schedule = schedule_from_config(index.schedule)
        self._students: dict[int, torch.nn.Module] = {}

    @classmethod
    def from_folder(cls, folder: str = DEFAULT_MODEL, device="cpu") -> "TextToImage":
        index = load_index(folder)
        part = lambda name: os.path.join(folder, name)  # noqa: E731
        return cls(AutoencoderKL.from_pretrained(part(index.autoencoder), device=device),
                   load_text_encoder(part(index.text_encoder)).to(device),
                   UNet.from_pretrained(part(index.unet), device=device), index, folder)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def student_steps(self) -> list[int]:
        return sorted(int(n) for n in self.index.students)

    def student(self, steps: int):
        """The GuidedStudent distilled to `steps` steps (loaded once)."""
        from ldm.distill.student import GuidedStudent
        if str(steps) not in self.index.students:
            raise ValueError(f"no student for {steps} steps in {self.folder}; have {self.student_steps}")
        if steps not in self._students:
            path = os.path.join(self.folder, self.index.students[str(steps)])
            self._students[steps] = GuidedStudent.from_pretrained(path, device=self.device).eval()
        return self._students[steps]

    def latent_shape(self, n: int) -> tuple[int, ...]:
        ae = self.autoencoder.config
        side = self.index.resolution // ae.downsample_factor
        return (n, ae.z_channels, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict:
        context, mask = self.text_encoder(prompts)
        return {"context": context, "context_mask": mask}

    def denoiser(self, net, prediction: str) -> Denoiser:
        return Denoiser(net, self.schedule, prediction, time_scale=self.index.time_scale)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, steps: int, guidance: float | None = None, seed: int = 0,
                 teacher: bool = False, sampler: str = "ddim", progress: bool = False) -> tuple[torch.Tensor, dict]:
        """Images (B, 3, H, W) in [-1, 1] and info {model, steps, nfe}; a student when one has `steps`."""
        w = self.index.guidance if guidance is None else guidance
        cond = self.encode_prompts(prompts)
        use_student = not teacher and steps in self._available_students()
        if use_student:
            model = self.denoiser(self.student(steps), self.index.student_prediction)
            extra, nfe, kind = {**cond, "w": w}, steps, f"student-{steps}"
        else:
            model = cfg(self.denoiser(self.unet, self.index.prediction), w, self.encode_prompts([""]))
            extra, nfe, kind = cond, steps * (1 if w == 0 else 2), "teacher"
        ts = self.schedule.timesteps(steps)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = initial_noise(self.schedule, ts, self.latent_shape(len(prompts)), generator=gen).to(self.device)
        z = SAMPLERS[sampler](model, x, ts, self.schedule, extra_args=extra, disable=not progress, generator=gen)
        images = self.autoencoder.decode_latents(z).clamp(-1, 1)
        return images, {"model": kind, "steps": steps, "nfe": nfe, "guidance": w}

    def _available_students(self) -> list[int]:
        return self.student_steps if self.folder else []
