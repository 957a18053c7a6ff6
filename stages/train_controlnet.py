"""Train a ControlNet (Zhang et al. 2023) for a trained model folder: its U-Net stays frozen.

    accelerate launch stages/train_controlnet.py --config configs/controlnet/shapes64.yaml [--resume latest] [key=value ...]
    python -m ldm.txt2img "a red circle" --teacher --controlnet runs/controlnet-shapes64/controlnet --control-image edges.png

The story: setup -> the frozen model (autoencoder, text encoder, U-Net) -> data -> the ControlNet, a copy
of the U-Net's encoder with zero output convolutions (at step 0 the controlled U-Net is the U-Net) ->
prepare -> EMA -> resume -> loop (latents, control images, caption dropout, text encoding, the model's own
diffusion loss through the controlled U-Net, update, log, validate, checkpoint) -> `<output_dir>/controlnet/`
(diffusers' ControlNetModel layout for SD-architecture U-Nets, else ours; both load with --controlnet).
Control images: `hint: edges` computes Sobel edges from each training picture (ldm.data.hints, which also
draws them for inference); `hint: column` reads them from the data (`data.control_column`).
Design notes: docs/controlnet.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ldm.data.hints import edge_map
from ldm.data.loaders import DataConfig, build_dataset, check_image_multiple, collate, make_dataloader
from ldm.diffusion import SAMPLERS, DiffusionLoss
from ldm.diffusion.guidance import drop_captions
from ldm.models.controlnet import ControlNet, save_controlnet
from ldm.models.unet import count_params, refuse_refiner, sdxl_time_ids
from ldm.pipeline import DEFAULT_MODEL, TextToImage
from ldm.training import (EMA, Checkpointer, NonFiniteGuard, ProgressBar, TrainConfig, build_optimizer,
                          build_scheduler, config_to_dict, log_images, one_batch_size, optimizer_step,
                          parse_args, setup)
from ldm.training.gather import ema_copy, is_sharded

logger = logging.getLogger("train_controlnet")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "controlnet" / "shapes64.yaml"


@dataclass
class ValConfig:
    images: int = 4                                        # held-out pictures: their control images steer the grid
    guidance: float = 2.0                                  # w of the controlled samples
    steps: int = 16                                        # teacher sampler steps
    sampler: str = "ddim"                                  # ldm.diffusion.samplers name
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"val.sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if self.images < 1 or self.steps < 1:
            raise ValueError(f"val.images and val.steps must be >= 1, got {self.images}, {self.steps}")


@dataclass
class ControlNetStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val: ValConfig = field(default_factory=ValConfig)
    model: str = DEFAULT_MODEL                             # the model folder whose frozen U-Net is steered
    hint: Literal["edges", "column"] = "edges"             # edges: Sobel edges of each picture; column: data.control_column
    edge_threshold: float = 0.1                            # edges: share of a black-to-white step (ldm.data.hints)
    p_uncond: float = 0.5                                  # captions -> "": the control image alone must carry the
                                                           # layout (Zhang et al. sec. 3.3 drop 50% of the prompts)
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def __post_init__(self):
        if self.hint == "column" and not self.data.control_column:
            raise ValueError("hint=column reads control images from the data: set data.control_column")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        self.data = one_batch_size(self.data, self.train)


def control_images(batch: dict, cfg: ControlNetStageConfig) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: computed from the pictures, or the data's."""
    if cfg.hint == "edges":
        return edge_map(batch["pixel_values"], cfg.edge_threshold)
    return batch["control"]


def heldout(cfg: ControlNetStageConfig) -> dict:
    """val.images fixed pictures with captions and control images: the shapes held-out split, else the data's first."""
    if cfg.data.source == "shapes":
        data = dataclasses.replace(cfg.data, split="heldout", length=cfg.val.images)
    else:
        data = dataclasses.replace(cfg.data, crop="center", flip=False, buckets=False)
    dataset = build_dataset(data)
    batch = collate([dataset[i] for i in range(min(cfg.val.images, len(dataset)))])
    return {"text": batch["text"], "hint": control_images(batch, cfg), "pixels": batch["pixel_values"]}


@torch.no_grad()
def validate(accelerator, pipe: TextToImage, net: ControlNet, val: dict, cfg: ControlNetStageConfig, step: int) -> None:
    """A PNG grid: rows = control image, picture, the teacher alone, the teacher steered; one column per picture."""
    was_training = net.training
    net.eval()
    common = dict(steps=cfg.val.steps, guidance=cfg.val.guidance, seed=cfg.val.seed, teacher=True,
                  sampler=cfg.val.sampler)
    plain, _ = pipe.generate(val["text"], **common)
    steered, _ = pipe.generate(val["text"], control=[(net, val["hint"].to(pipe.device), 1.0)], **common)
    net.train(was_training)
    rows = [val["hint"] * 2 - 1, val["pixels"], plain.cpu(), steered.cpu()]
    log_images(accelerator, torch.cat(rows), step, output_dir=cfg.train.output_dir, nrow=len(val["text"]))


def save_folder(net: ControlNet, pipe: TextToImage, cfg: ControlNetStageConfig, folder: Path) -> str:
    """The ControlNet folder, written whole or not at all."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sample_size = cfg.data.resolution // pipe.autoencoder.config.downsample_factor
    layout = save_controlnet(net, str(tmp), sample_size, getattr(torch, cfg.save_dtype))
    # what its control images must look like: `python -m ldm.data.hints IN OUT --controlnet DIR` draws the same
    hint = {"hint": cfg.hint, **({"edge_threshold": cfg.edge_threshold} if cfg.hint == "edges" else {})}
    (tmp / "hint.json").write_text(json.dumps(hint, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return layout


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(ControlNetStageConfig, "Train a ControlNet that steers a trained model's frozen U-Net.",
                     DEFAULT_CONFIG, argv)
    accelerator = setup(cfg.train, cfg, project="controlnet")
    device, output_dir = accelerator.device, Path(cfg.train.output_dir)
    if is_sharded(accelerator):
        raise ValueError("the ControlNet stage runs single-process or DDP, not FSDP (the frozen U-Net is not sharded)")

    # The frozen model: autoencoder, text encoder, U-Net and its schedule, as txt2img loads them.
    pipe = TextToImage.from_folder(cfg.model, device=device)
    for module in (pipe.autoencoder, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    refuse_refiner(pipe.index, "the ControlNet stage")
    factor = pipe.autoencoder.config.downsample_factor
    check_image_multiple(cfg.data, factor * pipe.unet.cfg.downsample_factor,
                         "the model's autoencoder factor x U-Net downsampling")
    data = make_dataloader(cfg.data, accelerator)
    val = heldout(cfg) if accelerator.is_main_process else None

    # The ControlNet: the U-Net's encoder copied, zero convolutions at zero.
    controlnet = ControlNet.from_unet(pipe.unet, factor, hint_channels=3)
    if cfg.train.gradient_checkpointing:                   # both: the frozen U-Net's activations are kept too
        controlnet.body.enable_gradient_checkpointing()
        pipe.unet.enable_gradient_checkpointing()
    logger.info("ControlNet %.2fM params (U-Net %.2fM, frozen)", count_params(controlnet) / 1e6,
                count_params(pipe.unet) / 1e6)
    optimizer = build_optimizer(controlnet, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(controlnet, optimizer)
    net = accelerator.unwrap_model(model)
    ema = EMA(net, cfg.train.ema_decay, cfg.train.ema_power) if cfg.train.ema_decay > 0 else None
    model_config = {"unet": config_to_dict(pipe.unet.cfg), "hint_widths": list(net.hint_widths), "model": cfg.model}
    ckpt = Checkpointer(accelerator, cfg.train, stage="controlnet", config=cfg, model=model, optimizer=optimizer,
                        scheduler=scheduler, ema=ema, data=data, model_config=model_config)
    step = ckpt.resume()  # restores the RNG last

    # The model's own objective (schedule, prediction, time units), now through the controlled U-Net.
    schedule, index = pipe.schedule, pipe.index
    loss_fn = DiffusionLoss(schedule, index.prediction, time="discrete" if hasattr(schedule, "num_timesteps")
                            else "continuous", time_scale=index.time_scale)

    def controlled(x, t, hint, context, context_mask=None, **added):      # added: SDXL's pooled text, numbers
        down, mid = model(x, t, context, hint, context_mask, **added)
        return pipe.unet(x, t, context, context_mask, control=(down, mid), **added)

    guard = NonFiniteGuard(cfg.train.max_nonfinite)
    bar = ProgressBar(accelerator, cfg.train.max_steps, initial=step)
    batches = data.forever()
    model.train()
    while step < cfg.train.max_steps:
        batch = next(batches)
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device)
            z = pipe.autoencoder.encode_latents(pixels, sample=True)
            hint = control_images({**batch, "pixel_values": pixels}, cfg).to(device)
            cond = pipe.encode_prompts(drop_captions(batch["text"], cfg.p_uncond))  # the seeded global RNG
            if "time_ids" in cond:   # SDXL: each picture's own size and crop numbers
                cond["time_ids"] = sdxl_time_ids(batch.get("size_ids"), z.shape,
                                                 pipe.autoencoder.config.downsample_factor).to(device)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = loss_fn(controlled, z, {"hint": hint, **cond})
            guard.observe(loss)
            accelerator.backward(loss)
            update = None
            if accelerator.sync_gradients:
                update = optimizer_step(accelerator, model, optimizer, scheduler, guard,
                                        max_grad_norm=cfg.train.max_grad_norm, ema=ema)
        if update is None:
            continue

        step += 1
        bar.update(update)
        if step % cfg.train.log_every == 0:
            accelerator.log({**update.metrics(), "train/skipped": guard.total_skipped}, step=step)
        if cfg.train.validate_every > 0 and step % cfg.train.validate_every == 0:
            with ema_copy(accelerator, model, ema, lambda: None) as ema_net:
                if ema_net is not None:
                    validate(accelerator, pipe, ema_net, val, cfg, step)
                    save_folder(ema_net, pipe, cfg, output_dir / "controlnet")
        ckpt.maybe_save(step)

    bar.close()
    with ema_copy(accelerator, model, ema, lambda: None) as ema_net:
        if ema_net is not None:
            layout = save_folder(ema_net, pipe, cfg, output_dir / "controlnet")
            logger.info("ControlNet folder (%s layout): %s", layout, output_dir / "controlnet")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir / "controlnet"


if __name__ == "__main__":
    main()
