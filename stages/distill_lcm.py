"""Latent consistency distillation into a LoRA (LCM-LoRA: Luo et al. 2023, "Latent Consistency Models", Alg. 1;
Luo et al. 2023b, "LCM-LoRA"): few-step sampling for a frozen model folder, as one file.

    accelerate launch stages/distill_lcm.py --config configs/lcm/shapes64.yaml [--resume latest] [key=value ...]
    python stages/distill_lcm.py --config configs/lcm/sd15.yaml teacher=models/sd15 data.source=webdataset ...
    python -m ldm.txt2img "a red circle" --model ldm/assets/shapes64 --lora runs/lcm-shapes64/lcm_lora.safetensors \\
        --teacher --sampler lcm --steps 4 --guidance 0

The story: setup -> the teacher folder as txt2img loads it (autoencoder, text encoder, U-Net and its schedule) ->
rank-r LoRA updates on its U-Net's linear layers (`lora.targets`), everything else frozen -> data (or the latent
cache) -> prepare -> resume -> loop -> `<output_dir>/lcm_lora.safetensors`. One update (ldm/distill/lcm.py):

    a pair (t_{n+k}, t_n) of LCM's grid of N points (`lcm.n_grid`, skip `lcm.skip`), w ~ U[w_min, w_max] a sample
    z_{t_{n+k}}: the training latents noised; the teacher's guided DDIM step from it to z^w_{t_n}, with the frozen
        base net (the LoRA bypassed, `lora_bypassed`: no second copy of the U-Net), (1 + w) cond - w uncond
    target: f(z^w_{t_n}, t_n) of the target net, no gradient: the online net itself (`lcm.target_decay` 0, as
        diffusers' LCM-LoRA script) or an EMA of the LoRA weights (> 0; LCM's 0.95)
    loss: pseudo-Huber (or l2) between the online f(z_{t_{n+k}}, t_{n+k}) and the target

with f = c_skip z + c_out x0-hat, the boundary scalings of `--sampler lcm` (ldm.diffusion.samplers.lcm_scalings).
As LCM-LoRA, the student does not take w: each sample's w enters its teacher target only, and the LoRA is drawn
at --guidance 0 (one network evaluation a step). The updates start at zero: the first online prediction is the
teacher's conditional one.

Grid: a discrete schedule (SD) takes diffusers' LCM timesteps 19, 39, ..., 999 (and 0); a continuous one (the
shipped shapes64: cosine log-SNR) the times n/N. `--spacing lcm`, the pipeline's default for --sampler lcm,
samples on n of those N = 50 points on either kind.

The file is stage 2's LoRA layout (diffusers' `unet.<module>.lora_A/B`, ldm.models.lora.lora_file_state) with
safetensors metadata {"kind": "lcm-lora", "lcm": its settings as JSON}; `--lora FILE` merges it. Only nn.Linear
layers take updates here (attention, feed-forward, the res blocks' time-embedding projections): diffusers' LCM-LoRA
also adapts the convolutions. U-Net teachers only (ours, SD 1.x/2.x; SDXL base untested); single process or DDP.
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ldm.data.loaders import DataConfig, check_image_multiple
from ldm.diffusion.guidance import drop_captions
from ldm.diffusion.param import Denoiser, append_dims, q_sample
from ldm.diffusion.schedules import LCM_ORIGINAL_STEPS
from ldm.distill.lcm import LOSSES, consistency, consistency_loss, draw_pairs, lcm_grid, lora_bypassed, teacher_solve
from ldm.models.lora import add_lora, lora_file_state
from ldm.models.unet import UNet, refuse_refiner
from ldm.models.weights import write_safetensors_atomic
from ldm.pipeline import DEFAULT_MODEL, TextToImage
from ldm.training import (EMA, Checkpointer, NonFiniteGuard, ProgressBar, TrainConfig, build_optimizer,
                          build_scheduler, config_to_dict, log_images, one_batch_size, optimizer_step, parse_args,
                          setup)
from ldm.training.gather import is_sharded
from ldm.training.latent_cache import scaled_latents, stage_loader

logger = logging.getLogger("distill_lcm")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lcm" / "shapes64.yaml"
FILE_NAME = "lcm_lora.safetensors"
# Our U-Net's linear layers: attention (diffusers' to_q, to_k, to_v, to_out.0), feed-forward (ff.net.0.proj,
# ff.net.2), the res blocks' time-embedding projections (time_emb_proj), the transformers' linear in/out projections
# (SD 2.x's proj_in, proj_out; SD 1.x and ours have convolutions there).
LINEAR_TARGETS = ("to_q", "to_k", "to_v", "to_out", "proj", "out", "emb_proj", "proj_in", "proj_out")


# ----------------------------------------------------------------------------- config

@dataclass
class LCMSettings:
    n_grid: int = 50                   # N: grid points of the teacher's time (LCM: 50 of SD's 1000 timesteps);
                                       # --spacing lcm samples on the N = 50 grid only
    skip: int = 1                      # k: grid points between a pair's ends (1 here = LCM's k = 20 timesteps)
    w_min: float = 1.0                 # w ~ U[w_min, w_max] a sample, in the teacher's target only; our convention
    w_max: float = 3.0                 # (1 + w) cond - w uncond: Stable Diffusion's scale s is w = s - 1
    loss: Literal["huber", "l2"] = "huber"   # pseudo-Huber sqrt(d^2 + c^2) - c per element (LCM-LoRA), or d^2
    huber_c: float = 0.001             # c, in latent units
    target_decay: float = 0.0          # the target net: 0 = the online net under stop-gradient (diffusers' LCM-LoRA
                                       # script); mu > 0 = an EMA of the LoRA weights, mu theta- + (1 - mu) theta (LCM: 0.95)
    p_uncond: float = 0.0              # captions dropped to "" (diffusers: 0); there the target is the uncond model's

    def __post_init__(self):
        if self.n_grid < 1 or not 1 <= self.skip <= self.n_grid:
            raise ValueError(f"lcm.n_grid must be >= 1 and lcm.skip in 1..n_grid, got {self.n_grid}, {self.skip}")
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= lcm.w_min <= lcm.w_max, got {self.w_min}, {self.w_max}")
        if self.loss not in LOSSES or not self.huber_c > 0:
            raise ValueError(f"lcm.loss must be one of {LOSSES} and lcm.huber_c > 0, got {self.loss!r}, {self.huber_c}")
        if not 0.0 <= self.target_decay < 1.0 or not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"lcm.target_decay must be in [0, 1) and lcm.p_uncond in [0, 1], got "
                             f"{self.target_decay}, {self.p_uncond}")

    def draw_w(self, n: int, device=None) -> torch.Tensor:
        """n guidance weights w ~ U[w_min, w_max] (the seeded global RNG)."""
        return self.w_min + (self.w_max - self.w_min) * torch.rand(n, device=device)


@dataclass
class LoRASettings:
    rank: int = 64                     # r of each update (LCM-LoRA for SD 1.5: 64)
    alpha: float = 0.0                 # the update is scaled by alpha / r; 0 = r (scale 1, diffusers' default)
    targets: list[str] = field(default_factory=lambda: list(LINEAR_TARGETS[:7]))   # ends of nn.Linear names

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LINEAR_TARGETS))
        if self.rank < 1 or self.alpha < 0 or unknown or not self.targets:
            raise ValueError(f"lora.rank must be >= 1, lora.alpha >= 0 and lora.targets among {list(LINEAR_TARGETS)}; "
                             f"got {self.rank}, {self.alpha}, {unknown or self.targets}")


@dataclass
class ValSettings:
    prompts: list[str] = field(default_factory=lambda: ["a red circle", "a large blue square",
                                                        "a green triangle to the left of a yellow circle"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4])   # grid rows: --sampler lcm --spacing lcm
    guidance: float = 0.0              # w of the samples (LCM-LoRA: 0, one evaluation a step)
    seed: int = 0                      # column i draws from seed + i, in every row and every time

    def __post_init__(self):
        if not self.prompts or not self.steps or not all(1 <= n <= LCM_ORIGINAL_STEPS for n in self.steps):
            raise ValueError(f"val needs prompts and steps in 1..{LCM_ORIGINAL_STEPS}, got {self.steps}")


@dataclass
class LCMStageConfig:
    teacher: str = DEFAULT_MODEL       # the frozen model folder (ours, SD 1.x/2.x or SDXL base from from_diffusers)
    # Encode a finite data set once (stage 2's latent cache; the same data config and autoencoder give stage 2's
    # and stage 3's cache back).
    cache_latents: bool = False
    cache_dir: str = ""                # "" = <output_dir>/latent-cache
    lcm: LCMSettings = field(default_factory=LCMSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    val: ValSettings = field(default_factory=ValSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not self.teacher:
            raise ValueError("set the teacher model folder: teacher=DIR (ours, or an SD import from from_diffusers)")
        self.data = one_batch_size(self.data, self.train)


# ----------------------------------------------------------------------------- the student

def add_updates(net: nn.Module, settings: LoRASettings) -> list[str]:
    """Freeze `net` and wrap its target linear layers in LoRALinear (B = 0: the net is unchanged); every target must
    name at least one nn.Linear of this net (SD 1.x's proj_in / proj_out are convolutions)."""
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in settings.targets if not any(f".{n}".endswith(f".{t}") for n in linear)]
    if missing:
        raise ValueError(f"lora.targets {missing} name no nn.Linear of this U-Net (only linear layers take updates "
                         "here; SD 1.x and ours have convolutional proj_in / proj_out)")
    return add_lora(net, settings.rank, settings.alpha or None, settings.targets)


def save_lcm_lora(net: nn.Module, cfg: LCMStageConfig, index, step: int) -> Path:
    """`<output_dir>/lcm_lora.safetensors`: stage 2's LoRA layout, its metadata saying what it is and how it learnt."""
    tensors, metadata = lora_file_state(net)
    settings = {**config_to_dict(cfg.lcm), "teacher": str(cfg.teacher), "schedule": index.schedule,
                "prediction": index.prediction, "timestep_scaling": 10.0, "sampler": "lcm", "spacing": "lcm",
                "guidance": 0.0, "step": step}
    path = Path(cfg.train.output_dir) / FILE_NAME
    write_safetensors_atomic(tensors, path, {**metadata, "kind": "lcm-lora", "lcm": json.dumps(settings)})
    return path


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(accelerator, pipe: TextToImage, cfg: LCMStageConfig, step: int) -> None:
    """A PNG grid: one row per val.steps count, one column per prompt (seed + column), the LCM sampler on its grid."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    seeds = [cfg.val.seed + i for i in range(len(cfg.val.prompts))]
    rows = [pipe.generate(cfg.val.prompts, steps=n, guidance=cfg.val.guidance, seed=seeds, teacher=True,
                          sampler="lcm", spacing="lcm")[0].cpu() for n in cfg.val.steps]
    log_images(accelerator, torch.cat(rows), step, output_dir=cfg.train.output_dir, nrow=len(cfg.val.prompts))
    pipe.unet.train(was_training)


# ----------------------------------------------------------------------------- the stage

def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(LCMStageConfig, __doc__, DEFAULT_CONFIG, argv)
    accelerator = setup(cfg.train, cfg, project="distill_lcm")
    device, lcm = accelerator.device, cfg.lcm
    if is_sharded(accelerator):
        raise ValueError("LCM-LoRA trains low-rank updates: run it single-process or DDP, not FSDP (the teacher is "
                         "the same net with its updates bypassed)")

    # The frozen model, as txt2img loads it. Its U-Net becomes the student (LoRA updates), the teacher (the updates
    # bypassed) and, with lcm.target_decay 0, the target net: one copy of the weights.
    pipe = TextToImage.from_folder(cfg.teacher, device=device)
    for module in (pipe.autoencoder, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    refuse_refiner(pipe.index, "LCM distillation")
    if not isinstance(pipe.unet, UNet) or pipe.index.guidance_embed:
        raise ValueError(f"LCM distillation here takes U-Net teachers (ours, SD 1.x/2.x, SDXL), not a "
                         f"{type(pipe.unet).__name__}")
    if pipe.index.resolution != cfg.data.resolution:
        raise ValueError(f"data.resolution={cfg.data.resolution} but the teacher folder's resolution is "
                         f"{pipe.index.resolution}")
    check_image_multiple(cfg.data, pipe.autoencoder.config.downsample_factor * pipe.unet.cfg.downsample_factor,
                         "the teacher's autoencoder factor x its U-Net's downsampling")
    if lcm.n_grid != LCM_ORIGINAL_STEPS:
        logger.warning("lcm.n_grid=%d: --spacing lcm samples on the %d-point grid, not this one", lcm.n_grid,
                       LCM_ORIGINAL_STEPS)
    net = pipe.unet
    names = add_updates(net, cfg.lora)
    net.train()
    if cfg.train.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    logger.info("LoRA rank %d on %d layers (%s): %.3fM trainable parameters", cfg.lora.rank, len(names),
                "/".join(cfg.lora.targets), sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6)

    data = stage_loader(accelerator, cfg.data, pipe.autoencoder, Path(cfg.teacher) / pipe.index.autoencoder,
                        (cfg.cache_dir or Path(cfg.train.output_dir) / "latent-cache") if cfg.cache_latents else None)

    optimizer = build_optimizer(net, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)      # stepped by us, not prepared
    model, optimizer = accelerator.prepare(net, optimizer)
    ema = EMA(net, cfg.train.ema_decay, cfg.train.ema_power) if cfg.train.ema_decay > 0 else None   # the exported
    target = EMA(net, lcm.target_decay) if lcm.target_decay > 0 else None                          # theta-
    model_config = {"teacher": str(cfg.teacher), "lora": config_to_dict(cfg.lora), "target_decay": lcm.target_decay}
    ckpt = Checkpointer(accelerator, cfg.train, stage="distill-lcm", config=cfg, model=model, optimizer=optimizer,
                        scheduler=scheduler, ema=ema, data=data, model_config=model_config,
                        extras={"target": target} if target is not None else None, trainable_only=True)
    step = ckpt.resume()                                   # restores the RNG last

    schedule, index = pipe.schedule, pipe.index
    # (N + 1,) t_0 < ... < t_N in the teacher's time units, in float32 as the samplers hand t to the net
    grid = lcm_grid(schedule, lcm.n_grid).float().to(device)
    uncond = pipe.encode_prompts([""])
    online = Denoiser(model, schedule, index.prediction, index.time_scale)   # through DDP: gradients sync
    frozen = Denoiser(net, schedule, index.prediction, index.time_scale)     # the same net: teacher and target
    guard = NonFiniteGuard(cfg.train.max_nonfinite)
    bar = ProgressBar(accelerator, cfg.train.max_steps, initial=step)
    batches = data.forever()
    while step < cfg.train.max_steps:
        batch = next(batches)
        with torch.no_grad():                              # latents at unit scale, a fresh posterior sample
            if cfg.cache_latents:
                z0 = scaled_latents(batch["mean"].to(device), batch["std"].to(device), pipe.autoencoder.config)
            else:
                z0 = pipe.autoencoder.encode_latents(batch["pixel_values"].to(device), sample=True)
            cond = pipe.encode_prompts(drop_captions(batch["text"], lcm.p_uncond))
        s, t = draw_pairs(grid, lcm.skip, z0.shape[0])     # (B,) t_{n+k}, t_n
        alpha, sigma = (append_dims(c.float(), z0.ndim) for c in schedule.alpha_sigma(s))
        z_s = q_sample(z0, torch.randn_like(z0), alpha, sigma)
        w = lcm.draw_w(z0.shape[0], device)
        with accelerator.accumulate(model):
            # Targets first: the EMA swap writes the LoRA weights in place, which the online graph must not see.
            with torch.no_grad(), accelerator.autocast():
                with lora_bypassed(net):                   # the teacher is the frozen base
                    z_t = teacher_solve(frozen, z_s, s, t, w, cond, uncond, schedule)
                with target.swapped() if target is not None else nullcontext():
                    f_target = consistency(frozen, z_t, t, schedule, **cond)
            with accelerator.autocast():
                f_online = consistency(online, z_s, s, schedule, **cond)
            loss = consistency_loss(f_online, f_target, lcm.loss, lcm.huber_c).mean()
            guard.observe(loss)
            accelerator.backward(loss)
            update = None
            if accelerator.sync_gradients:
                update = optimizer_step(accelerator, model, optimizer, scheduler, guard,
                                        max_grad_norm=cfg.train.max_grad_norm, ema=ema)
        if update is None:                                 # mid-accumulation, or a skipped non-finite update
            continue
        if target is not None:
            target.update()

        step += 1
        bar.update(update)
        if step % cfg.train.log_every == 0:
            accelerator.log({**update.metrics(), "train/skipped": guard.total_skipped}, step=step)
        if cfg.train.validate_every > 0 and step % cfg.train.validate_every == 0 and accelerator.is_main_process:
            with ema.swapped() if ema is not None else nullcontext():
                validate(accelerator, pipe, cfg, step)
                save_lcm_lora(net, cfg, index, step)
        ckpt.maybe_save(step)

    bar.close()
    path = Path(cfg.train.output_dir) / FILE_NAME
    if accelerator.is_main_process:
        with ema.swapped() if ema is not None else nullcontext():
            if not (cfg.train.validate_every > 0 and step % cfg.train.validate_every == 0):
                validate(accelerator, pipe, cfg, step)     # the last grid, unless the loop just drew it
            path = save_lcm_lora(net, cfg, index, step)
        logger.info("LCM-LoRA: %s (python -m ldm.txt2img PROMPT --model %s --lora %s --teacher --sampler lcm "
                    "--spacing lcm --steps 4 --guidance 0)", path, cfg.teacher, path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


if __name__ == "__main__":
    main()
