"""Stage 3: guided two-step distillation (Meng et al., CVPR 2023) of a CFG teacher into few-step students.

    accelerate launch stages/distill.py --config configs/distill/shapes64.yaml teacher=runs/latent/model
    python stages/distill.py --config configs/distill/tiny.yaml teacher=DIR [--resume latest] [key=value ...]

Stage one (Meng sec. 4.1): a w-conditioned student, initialised from the teacher, learns the
teacher's guided x-prediction (1 + w) x(z_t, c) - w x(z_t, "") for w ~ U[w_min, w_max], t ~ U[0, 1]
(in the teacher's own time units: U[0, T-1] for a discrete teacher; optionally shifted towards noise:
distill.time_shift).
It is the N_start-step model (DDIM). Stage two (Meng sec. 4.2, Salimans & Ho 2022 Alg. 2): rounds
halve the step count, N_start -> N_start/2 -> ... -> n_end; each student starts from its teacher
(the previous round's student) and learns two of its DDIM steps in one. Optional path rounds
(distill.path_updates, ldm/distill/paths.py) then fine-tune chosen students on the CFG teacher's
own many-step DDIM paths, which a chain of halvings can only approach; optional distribution-matching
rounds (distill.dmd_updates, ldm/distill/dmd.py) after them make a student's samples distributed as
the teacher's rather than close to its images in squared error.

A FLUX.1-dev teacher is guidance-distilled already: it takes the guidance scale s as an input, so it is
Meng's stage-one student. Stage one is not run; the halvings start from the teacher itself, w entering as its
guidance scale s = 1 + w (the pipeline's convention: `--guidance 2.5` is FLUX.1's 3.5), on its rectified flow
and the grid the pipeline samples data.resolution on (FLUX.1's resolution-dependent shift). The N_start-step
model is the teacher, so no student-N_start is written. FLUX.1-schnell is refused: it is step-distilled
already and has no guidance input to carry w.

distill.frozen_dtype holds the frozen nets (the teacher's net, its text encoders, the autoencoder, each round's
teacher) in bf16 or fp16 while the students train in fp32: the big teachers' presets (SDXL, SD3, FLUX.1-dev) set
bfloat16. A FLUX.1 student records the shift of the grid it learnt (grid_shift), which the pipeline samples it on.

Every round trains in its own folder output_dir/<round>/ (checkpoints, samples, the final student)
and writes its student into the model folder as student-N (model_index.json "students").
`--resume latest` skips finished rounds and continues the unfinished one from its last checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from tqdm.auto import tqdm

from ldm.data.loaders import DataConfig, check_image_multiple
from ldm.diffusion.guidance import cfg as cfg_guidance
from ldm.diffusion.guidance import drop_captions
from ldm.diffusion.losses import check_time_shift, shift_times, uniform_times
from ldm.diffusion.param import Denoiser, q_sample
from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.diffusion.schedules import shifted
from ldm.distill.dmd import T_RANGE, dmd_direction, dmd_loss, unrolled_ddim
from ldm.distill.paths import load_paths, path_batch, path_error, save_paths, teacher_path
from ldm.distill.student import GuidedStudent, guidance_input
from ldm.distill.targets import (grid_rows, stage_one_target, stage_two_target, student_grid, teacher_states,
                                 x_space_loss)
from ldm.models.nets import build_net, load_net
from ldm.models.unet import refuse_refiner
from ldm.pipeline import INDEX_NAME, ModelIndex, TextToImage, load_index, save_index
from ldm.training import (EMA, Checkpointer, NonFiniteGuard, ProgressBar, TrainConfig, build_optimizer,
                          build_scheduler, log_images, one_batch_size, optimizer_step, parse_args,
                          seed_everything, setup)
from ldm.training.gather import main_process_copy
from ldm.training.latent_cache import scaled_latents, stage_loader

logger = logging.getLogger("distill")
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "distill" / "shapes64.yaml")


# ----------------------------------------------------------------------------- config

def halving_steps(n_start: int, n_end: int) -> list[int]:
    """The students' steps of the halving rounds: N_start/2, N_start/4, ..., n_end."""
    steps, n = [], n_start
    while n > n_end:
        n //= 2
        steps.append(n)
    return steps


@dataclass
class DistillSettings:
    w_min: float = 0.0                 # guidance strengths learnt: w ~ U[w_min, w_max] (Imagen convention)
    w_max: float = 4.0
    w_features: int = 64               # Fourier features of w in the student's w-embedding
    p_uncond: float = 0.1              # captions dropped to "", so students keep the empty prompt
    n_start: int = 64                  # the stage-one student is round one's N_start-step teacher
    n_end: int = 1                     # the last round's student steps
    stage_one_steps: int = 1000        # optimizer updates of stage one (train.max_steps is not used)
    round_steps: int = 500             # optimizer updates of each halving round
    # Updates of single rounds by their student's steps, e.g. {8: 1800, 4: 1800}: the last rounds
    # are the hard ones (each lost about 2 points at 600 updates on the shapes world, while
    # 64 -> 16 lost none; docs/stage3-distill.md).
    round_updates: dict[int, int] = field(default_factory=dict)
    # Learning rates of single rounds by their student's steps, e.g. {32: 5.0e-5}; others use
    # train.lr. An early round only has to learn a small two-step correction, which a high rate
    # can overshoot (docs/stage3-distill.md).
    round_lr: dict[int, float] = field(default_factory=dict)
    save_dtype: Literal["float16", "float32"] = "float16"   # students in the model folder
    # The frozen nets in this dtype: the teacher's net, its text encoder(s), the autoencoder (after any latent cache
    # is built, in fp32) and each round's teacher (a frozen copy of the student before it). They run in it and hand
    # their predictions on in fp32 (Denoiser), as TextToImage.from_folder(dtype=...) samples; the trained student
    # keeps fp32 master weights, read from the fp32 files. bfloat16 halves what a process holds besides the student
    # (FLUX.1-dev's 12B teacher: 48 -> 24 GB); float16 leaves the autoencoder in fp32 (SDXL's overflows fp16).
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    export: Optional[list[int]] = None  # step counts written into the model folder; None = every round
    val_prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square left of a green triangle"])
    val_w: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])   # one grid row per w
    val_seed: int = 0                  # validation noise: the same images every time
    # Stage one's times: t ~ U[0, 1] (Meng et al.) moved to log-SNR lambda(t) - 2 log time_shift for
    # a share time_shift_share of the samples, as stage 2's diffusion.time_shift(_share) (losses.py).
    time_shift: float = 1.0
    time_shift_share: float = 1.0
    # Rounds train on their sampling grid's steps (t, t', t''). "uniform": a step uniformly, as
    # Salimans & Ho; "shifted": a step with the probability stage one's (shifted) times fall in it,
    # so the high-noise steps that lay a picture out keep the weight stage one gave them.
    round_times: Literal["uniform", "shifted"] = "uniform"
    # Share of a round's samples whose z_t is the round teacher's own DDIM state at t (run from
    # noise, teacher_states) instead of noised data: a guided teacher's path holds states unlike
    # noised data, and a student samples on that path. 0 = Salimans & Ho. Costs teacher steps:
    # up to 2 (N/2 - 1) more per sample in a round of N teacher steps.
    teacher_path_share: float = 0.0
    # The loss weight max(SNR, 1) (Salimans & Ho) capped at snr_cap: None = no cap; a cap moves the
    # weight from the low-noise end (SNR in the thousands) to the steps that lay a picture out.
    snr_cap: Optional[float] = None
    # Teacher-path fine-tuning (ldm/distill/paths.py), after the rounds: `teacher_paths` DDIM paths
    # of the CFG teacher (`path_steps` steps from pure noise, training prompts, w ~ U[w_min, w_max])
    # are drawn once into output_dir/paths; then each student in path_updates ({steps: updates},
    # from its round's student) learns to land on them, at path_lr. The rounds' students can at
    # best match their round teacher's quality; the paths carry the many-step teacher's.
    path_updates: dict[int, int] = field(default_factory=dict)   # {} = off
    teacher_paths: int = 4096
    # More paths drawn (after the training ones) and never trained on: at each validation a path
    # round logs the student's path error on them and on as many training paths. A student can
    # learn the training paths' noise-to-image maps by heart (the shapes world's 2-step student,
    # 4224 paths seen 15 times: training error 0.16 -> 0.04, held-out 0.155 -> 0.136;
    # docs/stage3-distill.md); the gap shows it.
    path_holdout: int = 0
    path_steps: int = 64
    path_lr: float = 1.0e-4
    # Distribution matching (ldm/distill/dmd.py; Yin et al. 2024), after the path rounds: each
    # student in dmd_updates ({steps: updates}) starts from its path round's student (else its
    # round's), and its unrolled N-step sampler learns to draw as the CFG teacher does (stage one's
    # student is the real denoiser, a copy of it trained online on the student's samples at
    # dmd_fake_lr the fake one), plus dmd_reg times the squared error to the teacher's path end
    # points (the paths above; dmd_batch // 2 of them an update). Regression alone leaves a 2-step
    # student blending layouts; this took the shapes world's from 79.6% to 83.6%
    # (docs/stage3-distill.md). Constant rates, no EMA: the generator chases a moving fake denoiser.
    dmd_updates: dict[int, int] = field(default_factory=dict)   # {} = off
    dmd_lr: float = 2.0e-5
    dmd_fake_lr: float = 1.0e-4
    dmd_reg: float = 0.5
    dmd_batch: int = 32                # samples of the student an update (<= train.batch_size)

    def drop_captions(self, texts: list[str], generator=None) -> list[str]:
        """Captions with a share p_uncond replaced by "" (one uniform draw per caption)."""
        return drop_captions(texts, self.p_uncond, generator)

    def draw_w(self, n: int, device=None, generator=None) -> torch.Tensor:
        """n guidance weights w ~ U[w_min, w_max]."""
        return self.w_min + (self.w_max - self.w_min) * torch.rand(n, device=device, generator=generator)

    @property
    def needs_paths(self) -> bool:
        return bool(self.path_updates or self.dmd_updates)

    @property
    def path_keep(self) -> int:
        """The grid the paths keep their states on: the finest student's (it holds the others)."""
        return max(self.path_updates, default=1)

    def __post_init__(self):
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        ratio = self.n_start // self.n_end if self.n_end >= 1 else 0
        if self.n_end < 1 or self.n_start % self.n_end or ratio & (ratio - 1):
            raise ValueError(f"n_start ({self.n_start}) must be n_end ({self.n_end}) times a power of two")
        check_time_shift(self.time_shift, "continuous", "distill.time_shift", self.time_shift_share,
                         "distill.time_shift_share")
        if not 0.0 <= self.teacher_path_share <= 1.0:
            raise ValueError(f"distill.teacher_path_share={self.teacher_path_share}: must be in [0, 1]")
        if self.snr_cap is not None and not self.snr_cap >= 1.0:
            raise ValueError(f"distill.snr_cap={self.snr_cap}: must be >= 1 (the weight is max(SNR, 1)) or null")
        if self.stage_one_steps < 1 or self.round_steps < 1:
            raise ValueError(f"stage_one_steps and round_steps must be >= 1, got "
                             f"{self.stage_one_steps}, {self.round_steps}")
        # Keys of any halving of n_start count (a preset's stay valid when n_end cuts the rounds
        # short, e.g. a stage-one-only run); others are typos, named.
        steps = halving_steps(self.n_start, 1)
        for key, per_round in (("round_updates", self.round_updates), ("round_lr", self.round_lr),
                               ("path_updates", self.path_updates), ("dmd_updates", self.dmd_updates)):
            unknown = sorted(set(per_round) - set(steps))
            if unknown:
                raise ValueError(f"distill.{key}: no halving of n_start={self.n_start} gives a "
                                 f"{unknown}-step student; halvings: {steps}")
            if any(not v > 0 for v in per_round.values()):
                raise ValueError(f"distill.{key}: values must be > 0, got {per_round}")
        if self.dmd_updates and not (self.dmd_lr > 0 and self.dmd_fake_lr > 0 and self.dmd_reg >= 0
                                     and self.dmd_batch >= 2):
            raise ValueError(f"distill.dmd_lr={self.dmd_lr}, dmd_fake_lr={self.dmd_fake_lr} must be > 0, "
                             f"dmd_reg={self.dmd_reg} >= 0, dmd_batch={self.dmd_batch} >= 2")
        if self.needs_paths:
            if self.path_holdout < 0:
                raise ValueError(f"distill.path_holdout={self.path_holdout}: must be >= 0 (0 = none)")
            if self.path_steps % self.path_keep or self.teacher_paths < 1 or not self.path_lr > 0:
                raise ValueError(f"distill.path_steps={self.path_steps} must be a multiple of the largest "
                                 f"student in path_updates ({self.path_keep}); teacher_paths and path_lr > 0")


@dataclass
class DistillStageConfig:
    teacher: str = ""                  # model folder of stage 2 (model_index.json, autoencoder/, ...)
    model_out: Optional[str] = None    # model folder to write students into; None = the teacher folder
    # Encode a finite data set once (stage 2's latent cache): on a CPU the autoencoder pass costs
    # about as much as the distillation update itself. The same data config and autoencoder as
    # stage 2 give the same cache key, so stage 2's cache is reused.
    cache_latents: bool = False
    cache_dir: str = ""                # "" = <output_dir>/latent-cache
    distill: DistillSettings = field(default_factory=DistillSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        self.data = one_batch_size(self.data, self.train)


@dataclass
class Round:
    name: str                          # folder under output_dir and checkpoint stage name
    steps: int                         # the student's sampling steps
    updates: int                       # optimizer updates
    n_teacher: Optional[int]           # teacher steps (None: stage one, a path or a DMD round)
    lr: Optional[float] = None         # peak learning rate; None: train.lr
    # "data": stage one or a halving round (noised data); "paths": fine-tuning on the CFG teacher's
    # paths; "dmd": distribution matching. The last two start from the student before them.
    kind: Literal["data", "paths", "dmd"] = "data"


def source_round(rounds: list[Round], rnd: Round) -> str:
    """The round whose student a fine-tuning round starts from: the last one before it with the
    same steps (paths-N: round-N; dmd-N: paths-N where it is planned, else round-N)."""
    return [r for r in rounds[:rounds.index(rnd)] if r.steps == rnd.steps][-1].name


def plan_rounds(d: DistillSettings, stage_one: bool = True) -> list[Round]:
    """Stage one, halving rounds N_start/2, ..., n_end, then path rounds and DMD rounds. stage_one False: the
    teacher takes w itself (FLUX.1-dev), it is stage one's student."""
    halvings = [Round(f"round-{n}", n, d.round_updates.get(n, d.round_steps), 2 * n, d.round_lr.get(n))
                for n in halving_steps(d.n_start, d.n_end)]
    run = {r.steps for r in halvings}                            # fine-tune the rounds run only
    paths = [Round(f"paths-{n}", n, updates, None, d.path_lr, kind="paths")
             for n, updates in sorted(d.path_updates.items(), reverse=True) if n in run]
    dmd = [Round(f"dmd-{n}", n, updates, None, d.dmd_lr, kind="dmd")
           for n, updates in sorted(d.dmd_updates.items(), reverse=True) if n in run]
    return [Round("stage-one", d.n_start, d.stage_one_steps, None)] * stage_one + halvings + paths + dmd


# ----------------------------------------------------------------------------- teacher

def refuse_flux(index: ModelIndex) -> None:
    """ValueError for the FLUX.1 teachers stage 3 cannot distil: -schnell and the image-conditioned nets."""
    if not index.guidance_embed:
        raise ValueError("stage 3 does not take a FLUX.1-schnell teacher: it is step-distilled already (1-4 steps) and "
                         "has no guidance input to carry w; distil FLUX.1-dev (it takes the guidance scale) instead")
    if index.image_input:
        raise ValueError(f"stage 3 does not take a FLUX.1 teacher with image_input {index.image_input!r} (Fill, Depth "
                         "/ Canny, Kontext): the stage feeds no image besides the noise; distil FLUX.1-dev")


def student_schedule(parts: TextToImage):
    """The schedule whose grids the students learn: the folder's; FLUX.1's at its resolution-dependent shift for
    the model's resolution (`TextToImage.grid_shift`), the grid the pipeline draws that size on."""
    shift = parts.grid_shift(parts.latent_shape(1))
    return parts.schedule if shift is None else shifted(parts.schedule, shift)


def round_student(cfg: DistillStageConfig, parts: TextToImage, name: str, device, copy: bool = True) -> GuidedStudent:
    """The student round `name` finished with, read back: an fp32 copy to train, or (`copy` False) a frozen one in
    distill.frozen_dtype to teach. A guidance-distilled teacher's (FLUX.1-dev) "stage-one" student is the teacher
    itself, w as its guidance scale 1 + w (BFL's guidance distillation was Meng's stage one): a copy of its net to
    train, or the teacher's own frozen net to teach."""
    if name == "stage-one" and parts.index.guidance_embed:
        return teacher_copy(cfg, parts, device) if copy else GuidedStudent(parts.unet, w_input="guidance")
    student = GuidedStudent.from_pretrained(os.path.join(cfg.train.output_dir, name, "student"))   # on the CPU
    if copy:
        return student.to(device)
    # Cast on the way to the device: the fp32 copy never sits beside the frozen one there.
    return student.to(device, getattr(torch, cfg.distill.frozen_dtype)).eval().requires_grad_(False)


def teacher_copy(cfg: DistillStageConfig, parts: TextToImage, device) -> GuidedStudent:
    """A student initialised from the teacher's net, in fp32: a copy of parts.unet, or, when distill.frozen_dtype cast
    that, the folder's weights read again (a copy of the cast net would round the student's master weights)."""
    if next(parts.unet.parameters()).dtype == torch.float32:
        return GuidedStudent.from_teacher(parts.unet, cfg.distill.w_features)
    net = load_net(os.path.join(cfg.teacher, parts.index.unet)).to(device)
    return GuidedStudent(net, cfg.distill.w_features, w_input=guidance_input(net))


def park_teacher(parts: TextToImage, device, runs: bool) -> None:
    """A guidance-distilled teacher's net (FLUX.1-dev's 12B) on the device for a round that `runs` it, else on the CPU:
    the rounds from the second halving on hold their own 12B teacher, and with both a process holds 57.5 GB of frozen
    nets in bf16 (configs/distill/flux-dev.yaml). Other teachers stay put: their rounds fit beside them, and SDXL's
    size numbers are made on the net's device (TextToImage.size_ids)."""
    if parts.index.guidance_embed:
        parts.unet.to(device if runs else "cpu")


def guided_teacher(parts: TextToImage):
    """The guided teacher as one x0-model of (x, t, w=(B,), **cond): CFG against the empty prompt at w (Meng eq.
    5), or a guidance-distilled net (FLUX.1-dev) given w as its guidance scale 1 + w."""
    net = GuidedStudent(parts.unet, w_input="guidance") if parts.index.guidance_embed else parts.unet
    teacher = Denoiser(net, parts.schedule, parts.index.prediction, parts.index.time_scale)
    if parts.index.guidance_embed:
        return teacher
    uncond = parts.encode_prompts([""])
    return lambda x, t, w, **cond: cfg_guidance(teacher, w, uncond)(x, t, **cond)


# ----------------------------------------------------------------------------- model folder

def prepare_model_folder(cfg: DistillStageConfig) -> str:
    """The folder students go to: the teacher's, or a copy of its parts in model_out."""
    out = cfg.model_out or cfg.teacher
    if cfg.model_out and not os.path.isfile(os.path.join(out, INDEX_NAME)):
        index = load_index(cfg.teacher)
        for part in (index.autoencoder, index.text_encoder, index.unet):
            shutil.copytree(os.path.join(cfg.teacher, part), os.path.join(out, part), dirs_exist_ok=True)
        save_index(out, dataclasses.replace(index, students={}))
    return out


def export_student(student: GuidedStudent, folder: str, steps: int, dtype: str, prediction: str) -> None:
    """Write student-N into the model folder and list it in model_index.json."""
    student.save_pretrained(os.path.join(folder, f"student-{steps}"), dtype=getattr(torch, dtype))
    index = load_index(folder)
    students = {**index.students, str(steps): f"student-{steps}"}
    students = dict(sorted(students.items(), key=lambda kv: -int(kv[0])))
    save_index(folder, dataclasses.replace(index, students=students, student_prediction=prediction))


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(accelerator, student, parts: TextToImage, rnd: Round, d: DistillSettings, step: int, out_dir):
    """A grid of the same prompts (columns) at each w in val_w (rows), from a fixed generator."""
    net = accelerator.unwrap_model(student)
    was_training = net.training
    net.eval()
    model = Denoiser(net, parts.schedule, parts.index.prediction, parts.index.time_scale)
    prompts = d.val_prompts * len(d.val_w)
    w = torch.tensor(d.val_w, device=accelerator.device).repeat_interleave(len(d.val_prompts))   # (rows*cols,)
    ts = parts.schedule.timesteps(rnd.steps)
    gen = torch.Generator().manual_seed(d.val_seed)
    x = initial_noise(parts.schedule, ts, parts.latent_shape(len(d.val_prompts)), generator=gen)
    x = x.repeat(len(d.val_w), 1, 1, 1).to(accelerator.device)   # the same noise in every row
    z = sample_ddim(model, x, ts, parts.schedule, extra_args={**parts.encode_prompts(prompts), "w": w},
                    disable=True)
    z = z.to(next(parts.autoencoder.parameters()).dtype)        # the autoencoder's (distill.frozen_dtype)
    log_images(accelerator, parts.decode(z), step, tag=f"val/{rnd.name}", output_dir=out_dir,
               nrow=len(d.val_prompts))
    net.train(was_training)


@torch.no_grad()
def log_path_errors(accelerator, student, parts: TextToImage, rnd: Round, paths, heldout, step: int) -> None:
    """The student's path error (ldm/distill/paths.py) on the held-out paths and on as many training paths."""
    net = accelerator.unwrap_model(student)
    was_training = net.training
    net.eval()
    model = Denoiser(net, parts.schedule, parts.index.prediction, parts.index.time_scale)
    n, errors = heldout[0].shape[1], {}
    for name, (states, w, prompts) in (("heldout", heldout), ("train", (paths[0][:, :n], paths[1][:n], paths[2][:n]))):
        extra = {**parts.encode_prompts(prompts), "w": w.to(accelerator.device)}
        errors[name] = path_error(model, states.to(accelerator.device), rnd.steps, parts.schedule, extra)
    net.train(was_training)
    accelerator.log({f"{rnd.name}/path_error_{k}": v for k, v in errors.items()}, step=step)
    logger.info("%s step %d: path error held-out %.4f, training %.4f (%d paths each)", rnd.name, step,
                errors["heldout"], errors["train"], n)


# ----------------------------------------------------------------------------- one round

def data_batch(accelerator, cfg: DistillStageConfig, rnd: Round, parts: TextToImage, teacher, grid, uncond, batch):
    """(z_t, t, cond, w, target) from a data batch: noised latents and the teacher's targets for them.

    Stage one (grid None): t ~ U[0, 1] over the schedule (maybe shifted) and the guided teacher's x (Meng eq. 5);
    a halving round: a step (t, t', t'') of the grid and the x of its teacher's two DDIM steps.
    """
    d, schedule, device = cfg.distill, parts.schedule, accelerator.device
    with torch.no_grad():
        if cfg.cache_latents:                                    # z ~ q(z|x) from the cached moments
            x0 = scaled_latents(batch["mean"].to(device), batch["std"].to(device), parts.autoencoder.config)
        else:
            ae = parts.autoencoder                               # in distill.frozen_dtype: latents back in fp32
            x0 = ae.encode_latents(batch["pixel_values"].to(device, next(ae.parameters()).dtype)).float()  # (B, C, h, w)
        cond = parts.encode_prompts(d.drop_captions(batch["text"]))
    B = x0.shape[0]
    w = d.draw_w(B, device)                                                           # (B,)
    if grid is None or d.round_times == "shifted":               # stage one's t ~ U[0, 1], maybe shifted
        t = shift_times(schedule, uniform_times(schedule, torch.rand(B, device=device, dtype=torch.float64)),
                        d.time_shift, d.time_shift_share)
    if grid is not None:                                         # stage two: a step (t, t', t'') of the grid
        rows = (grid_rows(grid, t) if d.round_times == "shifted"
                else torch.randint(0, len(grid), (B,), device=device))
        t, t_mid, t_end = grid[rows].unbind(1)
    alpha, sigma = (c.float() for c in schedule.alpha_sigma(t))                      # (B,)
    z_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
    with accelerator.autocast():
        if grid is not None and d.teacher_path_share > 0:
            own = (torch.rand(B, device=device) < d.teacher_path_share).nonzero().squeeze(1)
            noise = initial_noise(schedule, grid[0, :1], (len(own), *x0.shape[1:]), device=device)
            extra = {key: v[own] for key, v in {**cond, "w": w}.items()}
            z_t[own] = teacher_states(teacher, noise, rows[own], schedule, rnd.n_teacher, extra).to(z_t)
        if grid is None:
            target = stage_one_target(teacher, z_t, t, w, cond, uncond)
        else:
            target = stage_two_target(teacher, z_t, t, t_mid, t_end, schedule, {**cond, "w": w})
    return z_t, t, cond, w, target


def path_round_batches(cfg: DistillStageConfig, rnd: Round, parts: TextToImage, paths, device):
    """A function drawing (z_t, t, cond, w, target) batches from the teacher's paths (ldm/distill/paths.py)."""
    states, ws, prompts = paths

    def draw():
        z_t, t, target, idx = path_batch(states, rnd.steps, parts.schedule, cfg.train.batch_size)
        cond = parts.encode_prompts([prompts[k] for k in idx.tolist()])
        return z_t.to(device), t.to(device), cond, ws[idx].to(device), target.to(device)
    return draw


class DMDUpdates:
    """A DMD round's work (ldm/distill/dmd.py): the student's loss, then one update of the fake denoiser
    on the same samples (DMD Alg. 1). `real` is the guided teacher as one x0-model of (x_t, t, cond, w)."""

    def __init__(self, accelerator, cfg: DistillStageConfig, rnd: Round, parts: TextToImage, student_x0,
                 real, fake, fake_optimizer, paths, batches):
        self.accelerator, self.d, self.parts, self.student_x0, self.real = accelerator, cfg.distill, parts, student_x0, real
        self.fake, self.fake_optimizer, self.paths, self.batches = fake, fake_optimizer, paths, batches
        self.fake_x0 = Denoiser(fake, parts.schedule, parts.index.prediction, parts.index.time_scale)
        self.ts, self.max_grad_norm, self.samples = parts.schedule.timesteps(rnd.steps), cfg.train.max_grad_norm, None

    def student_loss(self) -> torch.Tensor:
        d, parts, device, schedule = self.d, self.parts, self.accelerator.device, self.parts.schedule
        texts = next(self.batches)["text"][: d.dmd_batch]
        extra = {**parts.encode_prompts(d.drop_captions(texts)), "w": d.draw_w(len(texts), device)}
        noise = initial_noise(schedule, self.ts, parts.latent_shape(len(texts)), device=device)
        u = T_RANGE[0] + (T_RANGE[1] - T_RANGE[0]) * torch.rand(len(texts), device=device)
        t = uniform_times(schedule, u)
        with self.accelerator.autocast():
            x = unrolled_ddim(self.student_x0, noise, self.ts, schedule, extra)
            loss = dmd_loss(x, dmd_direction(self.real, self.fake_x0, x, t, torch.randn_like(x), schedule, extra))
            if d.dmd_reg > 0:                                    # DMD's paired regression: the teacher's paths
                states, ws, prompts = self.paths
                idx = torch.randint(0, states.shape[1], (max(1, len(texts) // 2),))
                paired = {**parts.encode_prompts([prompts[k] for k in idx.tolist()]), "w": ws[idx].to(device)}
                end = unrolled_ddim(self.student_x0, states[0, idx].to(device), self.ts, schedule, paired)
                loss = loss + d.dmd_reg * (end.float() - states[-1, idx].to(device)).pow(2).mean()
        self.samples = (x.detach(), extra)
        return loss

    def update_fake(self) -> float:
        """The diffusion loss (truncated-SNR x space, t uniform over the schedule) of the fake denoiser."""
        x, extra = self.samples
        t = uniform_times(self.parts.schedule, torch.rand(x.shape[0], device=x.device))
        alpha, sigma = (c.float() for c in self.parts.schedule.alpha_sigma(t))
        x_t = q_sample(x, torch.randn_like(x), alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1))
        with self.accelerator.autocast():
            loss = x_space_loss(self.fake_x0(x_t, t, **extra), x, alpha, sigma).mean()
        self.fake_optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.fake.parameters(), self.max_grad_norm)
        self.fake_optimizer.step()
        return loss.item()


def train_round(accelerator, cfg: DistillStageConfig, rnd: Round, index: int, student: GuidedStudent,
                teacher, parts: TextToImage, loader, resume, stop_after, paths=None,
                heldout=None) -> GuidedStudent | None:
    """Train `student` for one round; returns it with its final (EMA) weights, or None if stopped early.

    teacher: the round teacher's x0-model (a DMD round: the real denoiser, a GuidedStudent's).
    paths: (states, w, prompts) of `load_paths` for a path or DMD round (its batches come from them);
    heldout: paths of the same kind it does not train on (their path error is logged), or None.
    """
    d, schedule, time_scale = cfg.distill, parts.schedule, parts.index.time_scale
    tcfg = dataclasses.replace(cfg.train, output_dir=os.path.join(cfg.train.output_dir, rnd.name),
                               max_steps=rnd.updates, resume=resume, lr=cfg.train.lr if rnd.lr is None else rnd.lr)
    if rnd.kind == "dmd":                                        # constant rate, no EMA (see DistillSettings)
        tcfg = dataclasses.replace(tcfg, lr_schedule="constant", warmup_steps=0, ema_decay=0.0)
    device = accelerator.device
    # A round starts from a state that depends on its index only, so resuming at a round boundary
    # repeats an uninterrupted run exactly; mid-round, the checkpoint restores the same state.
    seed_everything(cfg.train.seed + 1000 * index + accelerator.process_index)
    loader.load_state_dict({"epoch": index, "batch": 0})

    student.unet.enable_gradient_checkpointing(tcfg.gradient_checkpointing)   # recompute blocks in backward
    optimizer = build_optimizer(student, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)                 # not prepared: one step per update
    model, optimizer = accelerator.prepare(student, optimizer)
    ema = EMA(accelerator.unwrap_model(model), tcfg.ema_decay, tcfg.ema_power) if tcfg.ema_decay > 0 else None
    extras = {}
    if rnd.kind == "dmd":                                        # the fake denoiser starts as the real one, in fp32
        real = teacher.net
        fake = (copy.deepcopy(real) if next(real.parameters()).dtype == torch.float32
                else round_student(cfg, parts, "stage-one", device)).train().requires_grad_(True)
        fake.unet.enable_gradient_checkpointing(tcfg.gradient_checkpointing)
        fake_optimizer = torch.optim.AdamW(fake.parameters(), lr=d.dmd_fake_lr, betas=tuple(tcfg.betas),
                                           eps=tcfg.eps, weight_decay=0.0)
        fake, fake_optimizer = accelerator.prepare(fake, fake_optimizer)
        extras = {"fake": fake, "fake_optimizer": fake_optimizer}
    unet_cfg = dataclasses.asdict(accelerator.unwrap_model(model).unet.cfg)
    ckpt = Checkpointer(accelerator, tcfg, stage=f"distill-{rnd.name}", config=cfg, model=model,
                        optimizer=optimizer, scheduler=scheduler, ema=ema, data=loader, extras=extras,
                        model_config={"unet": unet_cfg, "w_features": d.w_features, "n_teacher": rnd.n_teacher,
                                      "w_input": accelerator.unwrap_model(model).w_input})
    step = ckpt.resume()                                         # restores the RNG last

    student_x0 = Denoiser(model, schedule, parts.index.prediction, time_scale)
    grid = student_grid(schedule, rnd.n_teacher).to(device) if rnd.n_teacher else None   # (N/2, 3)
    uncond = parts.encode_prompts([""])
    dmd = None
    if rnd.kind == "dmd":
        dmd = DMDUpdates(accelerator, cfg, rnd, parts, student_x0, teacher, fake, fake_optimizer, paths,
                         loader.forever())
        student_loss = dmd.student_loss
    else:                                                        # regression on the round's targets
        if rnd.kind == "data":                                   # noised data: stage one or a halving round
            batches = loader.forever()
            draw = lambda: data_batch(accelerator, cfg, rnd, parts, teacher, grid, uncond, next(batches))  # noqa: E731
        else:                                                    # states on the CFG teacher's paths
            draw = path_round_batches(cfg, rnd, parts, paths, device)

        def student_loss():
            z_t, t, cond, w, target = draw()
            alpha, sigma = (c.float() for c in schedule.alpha_sigma(t))                  # (B,)
            with accelerator.autocast():
                x_hat = student_x0(z_t, t, **cond, w=w)
            return x_space_loss(x_hat, target, alpha, sigma, d.snr_cap).mean()
    guard, bar = NonFiniteGuard(tcfg.max_nonfinite), ProgressBar(accelerator, rnd.updates, initial=step)
    bar.bar.set_description(rnd.name)
    model.train()
    while step < rnd.updates:
        if stop_after == (rnd.name, step):                       # test hook: the job dies here
            return None
        with accelerator.accumulate(model):
            loss = student_loss()
            guard.observe(loss)
            accelerator.backward(loss)
            update = None
            if accelerator.sync_gradients:
                update = optimizer_step(accelerator, model, optimizer, scheduler, guard,
                                        max_grad_norm=tcfg.max_grad_norm, ema=ema)
        if update is None:                                       # mid-accumulation, or a skipped update
            continue
        fake_loss = dmd.update_fake() if dmd is not None else None

        step += 1
        bar.update(update)
        if step % tcfg.log_every == 0:
            metrics = {f"{rnd.name}/{k.split('/')[-1]}": v for k, v in update.metrics().items()}
            if fake_loss is not None:
                metrics[f"{rnd.name}/fake_loss"] = fake_loss
            accelerator.log(metrics, step=step)
        if step == rnd.updates or (tcfg.validate_every > 0 and step % tcfg.validate_every == 0):
            with ema.swapped() if ema is not None else torch.no_grad():
                validate(accelerator, model, parts, rnd, d, step, tcfg.output_dir)
                if heldout is not None:
                    log_path_errors(accelerator, model, parts, rnd, paths, heldout, step)
        ckpt.maybe_save(step)
    bar.close()

    final = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(final)                                       # the student is the EMA of its weights
    # Rank 0 saves alone: under FSDP2 every process gathers the shards into a plain copy for it.
    plain = main_process_copy(accelerator, model, lambda: GuidedStudent(build_net(final.unet.cfg), d.w_features,
                                                                         w_input=final.w_input))
    if accelerator.is_main_process:
        plain.w_range = (float(d.w_min), float(d.w_max))   # what it learnt: saved in its config
        if parts.index.dynamic_shift is not None:          # FLUX.1: the grid it learnt, whatever size is drawn
            plain.grid_shift = parts.schedule.grid_shift
        plain.save_pretrained(os.path.join(tcfg.output_dir, "student"))   # fp32: next round's teacher
    accelerator.wait_for_everyone()
    accelerator.free_memory()                                    # drop the round's prepared objects
    return plain if accelerator.is_main_process else final      # the others export nothing


# ----------------------------------------------------------------------------- teacher paths

@torch.no_grad()
def draw_teacher_paths(accelerator, cfg: DistillStageConfig, parts: TextToImage, loader, epoch: int):
    """The CFG teacher's DDIM paths, drawn into output_dir/paths (files there are kept), then loaded:
    (training paths, held-out paths or None), each as `load_paths` returns them.

    File b holds one batch: its prompts (training captions, p_uncond of them dropped), w ~ U[w_min,
    w_max] and noise, all drawn from a generator seeded by (train.seed, b), so an interrupted draw
    resumes with the same paths; processes draw every world-th file. The held-out files follow the
    training ones, so adding them later leaves the training paths as they were.
    """
    d, batch = cfg.distill, cfg.train.batch_size
    folder = Path(cfg.train.output_dir) / "paths"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [min(batch, d.teacher_paths - b * batch) for b in range(-(-d.teacher_paths // batch))]
    n_train = len(sizes)
    sizes += [min(batch, d.path_holdout - b * batch) for b in range(-(-d.path_holdout // batch))]
    files = [folder / f"paths-{b:05d}.safetensors" for b in range(len(sizes))]
    teacher, ts = guided_teacher(parts), parts.schedule.timesteps(d.path_steps)
    loader.load_state_dict({"epoch": epoch, "batch": 0})
    batches = loader.forever()
    todo = [b for b, f in enumerate(files) if b % accelerator.num_processes == accelerator.process_index
            and not f.is_file()]
    logger.info("teacher paths: %d of %d files to draw (%d paths and %d held out, %d DDIM steps, states on "
                "a %d-step grid)", len(todo), len(files), d.teacher_paths, d.path_holdout, d.path_steps, d.path_keep)
    bar = tqdm(total=len(todo), desc="teacher paths", disable=not accelerator.is_local_main_process)
    for b, f in enumerate(files):
        texts = next(batches)["text"]                            # file b's captions, whoever draws it
        if b not in todo:
            continue
        n = min(sizes[b], len(texts))
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + b)
        prompts = d.drop_captions(texts[:n], gen)
        w = d.draw_w(n, generator=gen)
        noise = initial_noise(parts.schedule, ts, parts.latent_shape(n), generator=gen)
        states = teacher_path(teacher, noise.to(accelerator.device), ts, parts.schedule, d.path_keep,
                              {**parts.encode_prompts(prompts), "w": w.to(accelerator.device)})
        save_paths(f, states.cpu(), w, prompts)
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    return load_paths(files[:n_train]), load_paths(files[n_train:]) if d.path_holdout else None


# ----------------------------------------------------------------------------- the stage

def first_unfinished(cfg: DistillStageConfig, rounds: list[Round]) -> tuple[int, list]:
    """(index of the first round to train, per-round resume values) for train.resume."""
    resume, out = cfg.train.resume, Path(cfg.train.output_dir)
    done = lambda r: (out / r.name / "student" / "model.safetensors").is_file()   # noqa: E731
    if resume is None:
        return 0, [None] * len(rounds)
    if resume == "latest":
        start = next((i for i, r in enumerate(rounds) if not done(r)), len(rounds))
        return start, ["latest"] * len(rounds)
    names = [r.name for r in rounds]
    parent = Path(resume).resolve().parent.name
    if parent not in names:
        raise ValueError(f"train.resume={resume!r}: not a checkpoint of a round folder {names}")
    start = names.index(parent)
    missing = [r.name for r in rounds[:start] if not done(r)]
    if missing:
        raise FileNotFoundError(f"train.resume={resume!r}: earlier rounds {missing} have no finished student in {out}")
    return start, [None] * start + [resume] + [None] * (len(rounds) - start - 1)


def run(cfg: DistillStageConfig, stop_after: tuple[str, int] | None = None) -> str | None:
    """Both stages; returns the model folder (None when `stop_after` cut the run short)."""
    if not cfg.teacher:
        raise ValueError("set the teacher model folder: teacher=DIR (a stage-2 model folder)")
    accelerator = setup(cfg.train, cfg, project="distill")
    device = accelerator.device

    # The frozen parts: autoencoder, text encoder and the teacher's net (a U-Net, SD3's MMDiT or FLUX.1-dev's Flux),
    # the last two in distill.frozen_dtype.
    frozen = getattr(torch, cfg.distill.frozen_dtype)
    parts = TextToImage.from_folder(cfg.teacher, device=device, dtype=frozen)
    for module in (parts.autoencoder, parts.text_encoder, parts.unet):
        module.requires_grad_(False)
    if parts.index.prediction == "eps":
        logger.warning("the teacher predicts eps: few-step students are unstable in eps (Salimans & Ho "
                       "2022, sec. 4); prefer a v- or x0-prediction teacher")
    refuse_refiner(parts.index, "stage 3")
    if getattr(parts.unet.cfg, "kind", "unet") == "flux":
        refuse_flux(parts.index)
    if parts.index.resolution != cfg.data.resolution:
        raise ValueError(f"data.resolution={cfg.data.resolution} but the model folder's resolution is "
                         f"{parts.index.resolution}")
    check_image_multiple(cfg.data, parts.autoencoder.config.downsample_factor * parts.unet.cfg.downsample_factor,
                         "the teacher's autoencoder factor x its net's downsampling or patch size")
    folder = prepare_model_folder(cfg) if accelerator.is_main_process else (cfg.model_out or cfg.teacher)
    accelerator.wait_for_everyone()
    loader = stage_loader(accelerator, cfg.data, parts.autoencoder, Path(cfg.teacher) / parts.index.autoencoder,
                          (cfg.cache_dir or Path(cfg.train.output_dir) / "latent-cache") if cfg.cache_latents else None)
    if frozen != torch.float16:                                  # after the cache, which is encoded in fp32 as stage 2's
        parts.autoencoder.to(frozen)
    # Every grid below (the rounds', validation's, the teacher paths') is the one the pipeline samples on.
    parts.schedule = student_schedule(parts)
    rounds = plan_rounds(cfg.distill, stage_one=not parts.index.guidance_embed)   # FLUX.1-dev: no stage one
    export = cfg.distill.export
    start, resumes = first_unfinished(cfg, rounds)
    paths = heldout = None                                       # teacher paths, loaded for the path rounds

    for i, rnd in enumerate(rounds):
        round_dir = os.path.join(cfg.train.output_dir, rnd.name)
        if i < start:
            logger.info("%s: finished earlier, its student is in %s", rnd.name, round_dir)
            continue
        # The teacher's net runs in the first round (stage one, or a guidance-distilled teacher's first halving), as
        # DMD's real denoiser of a guidance-distilled teacher, and to draw the teacher paths.
        park_teacher(parts, device, runs=(rnd.kind == "data" and i == 0) or rnd.kind == "dmd"
                     or (rnd.kind != "data" and paths is None))
        # The teacher model function: the CFG teacher (stage one), or the previous student read back;
        # a path round fine-tunes its round's student on the CFG teacher's paths (drawn once), a DMD
        # round the student before it, against stage one's student.
        if rnd.kind != "data":
            if paths is None:
                paths, heldout = draw_teacher_paths(accelerator, cfg, parts, loader, len(rounds))
            teacher, student = None, round_student(cfg, parts, source_round(rounds, rnd), device)
            if rnd.kind == "dmd":                                # the real denoiser: stage one's student
                real = round_student(cfg, parts, "stage-one", device, copy=False)
                teacher = Denoiser(real, parts.schedule, parts.index.prediction, parts.index.time_scale)
        elif rnd.n_teacher is None:
            teacher = Denoiser(parts.unet, parts.schedule, parts.index.prediction, parts.index.time_scale)
            student = teacher_copy(cfg, parts, device)
        else:                                                    # a halving round: the student before it teaches
            previous = rounds[i - 1].name if i else "stage-one"
            teacher_net = round_student(cfg, parts, previous, device, copy=False)       # frozen_dtype
            teacher = Denoiser(teacher_net, parts.schedule, parts.index.prediction, parts.index.time_scale)
            student = round_student(cfg, parts, previous, device)                  # Salimans & Ho: init = teacher
        logger.info("%s: %d updates, %s-step student", rnd.name, rnd.updates, rnd.steps)
        final = train_round(accelerator, cfg, rnd, i, student.train(), teacher, parts, loader, resumes[i],
                            stop_after, *((paths, heldout) if rnd.kind != "data" else (None, None)))
        if final is None:
            return None
        if accelerator.is_main_process and (export is None or rnd.steps in export):
            export_student(final, folder, rnd.steps, cfg.distill.save_dtype, parts.index.prediction)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    written = sorted({r.steps for r in rounds if export is None or r.steps in export}, reverse=True)
    logger.info("students %s written to %s", written, folder)
    return folder


def main(argv: list[str] | None = None) -> str | None:
    cfg = parse_args(DistillStageConfig, __doc__, DEFAULT_CONFIG, argv)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
