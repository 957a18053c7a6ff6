"""Train a ControlNet (Zhang et al. 2023) or a T2I-Adapter (Mou et al. 2023) for a trained model folder: its
U-Net stays frozen.

    accelerate launch stages/train_controlnet.py --config configs/controlnet/shapes64.yaml [--resume latest] [key=value ...]
    python -m ldm.txt2img "a red circle" --teacher --controlnet runs/controlnet-shapes64/controlnet --control-image edges.png
    python stages/train_controlnet.py --config configs/controlnet/shapes64-adapter.yaml        # kind: t2i_adapter
    python -m ldm.txt2img "a red circle" --teacher --t2i-adapter runs/adapter-shapes64/adapter --adapter-image edges.png

The story: setup -> the frozen model (autoencoder, text encoder, U-Net) -> data -> the ControlNet, a copy
of the U-Net's encoder with zero output convolutions (at step 0 the controlled U-Net is the U-Net) ->
prepare -> EMA -> resume -> loop (latents, control images, caption dropout, text encoding, the model's own
diffusion loss through the controlled U-Net, update, log, validate, checkpoint) -> `<output_dir>/controlnet/`
(diffusers' ControlNetModel layout for SD-architecture U-Nets, else ours; both load with --controlnet).
`kind: t2i_adapter` trains a small conv net on the control image alone instead (`adapter.type`, `.channels`:
its features must fit the U-Net's levels, T2IAdapter.check_base), its features added in the U-Net's encoder
(Mou et al. eq. 4), written to `<output_dir>/adapter/` as a diffusers T2IAdapter folder (--t2i-adapter).
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
from ldm.diffusion.losses import check_robust_loss
from ldm.models.controlnet import ControlNet, save_controlnet
from ldm.models.t2i_adapter import KINDS, T2IAdapter, save_t2i_adapter
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
class AdapterConfig:                                       # kind: t2i_adapter (diffusers' T2IAdapter arguments)
    type: str = "full_adapter"                             # full_adapter (SD 1.x/2.x), full_adapter_xl, light_adapter
    channels: tuple[int, ...] = (320, 640, 1280, 1280)     # one width per feature: the U-Net's at each place it adds
    num_res_blocks: int = 2                                # residual blocks per level
    downscale_factor: int = 8                              # pixel-unshuffle: the first features' stride in pixels

    def __post_init__(self):
        if self.type not in KINDS:
            raise ValueError(f"adapter.type must be one of {', '.join(KINDS)}, got {self.type!r}")
        if not self.channels or self.num_res_blocks < 1 or self.downscale_factor < 1:
            raise ValueError("adapter.channels must be non-empty, num_res_blocks and downscale_factor >= 1")


@dataclass
class ControlNetStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val: ValConfig = field(default_factory=ValConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    kind: Literal["controlnet", "t2i_adapter"] = "controlnet"  # t2i_adapter: features from the control image alone,
                                                           # computed once per picture (Mou et al. 2023)
    time: Literal["uniform", "cubic"] = "uniform"          # training times: the model's own, or cubic (Mou et al.
                                                           # sec. 3.4: favours the early, noisy steps)
    loss_type: Literal["l2", "huber", "smooth_l1", "l1"] = "l2"  # as stage 2's diffusion.loss_type (losses.py)
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"  # huber/smooth_l1's c over time
    huber_c: float = 0.1                                   # c at pure noise (always, with huber_schedule constant)
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
        check_robust_loss(self.loss_type, self.huber_schedule, self.huber_c)
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


def build_net(cfg: ControlNetStageConfig, pipe: TextToImage, factor: int) -> ControlNet | T2IAdapter:
    """The trained net: a ControlNet (the U-Net's encoder copied, zero convolutions at zero), or a T2I-Adapter
    whose feature widths and strides are checked against the places the U-Net adds them."""
    if cfg.kind == "controlnet":
        return ControlNet.from_unet(pipe.unet, factor, hint_channels=3)
    a = cfg.adapter
    net = T2IAdapter(a.type, 3, a.channels, a.num_res_blocks, a.downscale_factor)
    net.check_base(pipe.unet, factor)
    return net


def steering(cfg: ControlNetStageConfig, net, hint: torch.Tensor) -> dict:
    """`generate`'s keyword that attaches `net` with its control images at scale 1."""
    return {"control" if cfg.kind == "controlnet" else "adapter": [(net, hint, 1.0)]}


@torch.no_grad()
def validate(accelerator, pipe: TextToImage, net, val: dict, cfg: ControlNetStageConfig, step: int) -> None:
    """A PNG grid: rows = control image, picture, the teacher alone, the teacher steered; one column per picture."""
    was_training = net.training
    net.eval()
    common = dict(steps=cfg.val.steps, guidance=cfg.val.guidance, seed=cfg.val.seed, teacher=True,
                  sampler=cfg.val.sampler)
    plain, _ = pipe.generate(val["text"], **common)
    steered, _ = pipe.generate(val["text"], **steering(cfg, net, val["hint"].to(pipe.device)), **common)
    net.train(was_training)
    rows = [val["hint"] * 2 - 1, val["pixels"], plain.cpu(), steered.cpu()]
    log_images(accelerator, torch.cat(rows), step, output_dir=cfg.train.output_dir, nrow=len(val["text"]))


def save_folder(net, pipe: TextToImage, cfg: ControlNetStageConfig, folder: Path) -> str:
    """The ControlNet or T2I-Adapter folder, written whole or not at all."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.kind == "controlnet":
        sample_size = cfg.data.resolution // pipe.autoencoder.config.downsample_factor
        layout = save_controlnet(net, str(tmp), sample_size, getattr(torch, cfg.save_dtype))
    else:
        save_t2i_adapter(net, str(tmp), getattr(torch, cfg.save_dtype))
        layout = "diffusers T2IAdapter"
    # what its control images must look like: `python -m ldm.data.hints IN OUT --controlnet DIR` draws the same
    hint = {"hint": cfg.hint, **({"edge_threshold": cfg.edge_threshold} if cfg.hint == "edges" else {})}
    (tmp / "hint.json").write_text(json.dumps(hint, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return layout


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(ControlNetStageConfig, "Train a ControlNet or T2I-Adapter that steers a trained model's "
                     "frozen U-Net.", DEFAULT_CONFIG, argv)
    accelerator = setup(cfg.train, cfg, project=cfg.kind)
    device, output_dir = accelerator.device, Path(cfg.train.output_dir)
    name = "ControlNet" if cfg.kind == "controlnet" else "T2I-Adapter"
    folder = output_dir / ("controlnet" if cfg.kind == "controlnet" else "adapter")
    if is_sharded(accelerator):
        raise ValueError(f"the {name} stage runs single-process or DDP, not FSDP (the frozen U-Net is not sharded)")

    # The frozen model: autoencoder, text encoder, U-Net and its schedule, as txt2img loads them.
    pipe = TextToImage.from_folder(cfg.model, device=device)
    for module in (pipe.autoencoder, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    refuse_refiner(pipe.index, f"the {name} stage")
    factor = pipe.autoencoder.config.downsample_factor
    check_image_multiple(cfg.data, factor * pipe.unet.cfg.downsample_factor,
                         "the model's autoencoder factor x U-Net downsampling")
    data = make_dataloader(cfg.data, accelerator)
    val = heldout(cfg) if accelerator.is_main_process else None

    # The trained net: a ControlNet (zero convolutions at zero), or a T2I-Adapter.
    trained = build_net(cfg, pipe, factor)
    if cfg.train.gradient_checkpointing:                   # the frozen U-Net's activations are kept too
        if cfg.kind == "controlnet":
            trained.body.enable_gradient_checkpointing()
        pipe.unet.enable_gradient_checkpointing()
    logger.info("%s %.2fM params (U-Net %.2fM, frozen)", name, count_params(trained) / 1e6,
                count_params(pipe.unet) / 1e6)
    optimizer = build_optimizer(trained, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(trained, optimizer)
    net = accelerator.unwrap_model(model)
    ema = EMA(net, cfg.train.ema_decay, cfg.train.ema_power) if cfg.train.ema_decay > 0 else None
    model_config = {"unet": config_to_dict(pipe.unet.cfg), "model": cfg.model,
                    **({"hint_widths": list(net.hint_widths)} if cfg.kind == "controlnet" else
                       {"adapter": config_to_dict(cfg.adapter)})}
    ckpt = Checkpointer(accelerator, cfg.train, stage=cfg.kind, config=cfg, model=model, optimizer=optimizer,
                        scheduler=scheduler, ema=ema, data=data, model_config=model_config)
    step = ckpt.resume()  # restores the RNG last

    # The model's own objective (schedule, prediction, time units), now through the steered U-Net.
    schedule, index = pipe.schedule, pipe.index
    own_time = "discrete" if hasattr(schedule, "num_timesteps") else "continuous"
    loss_fn = DiffusionLoss(schedule, index.prediction, time=own_time if cfg.time == "uniform" else "cubic",
                            time_scale=index.time_scale, loss_type=cfg.loss_type, huber_schedule=cfg.huber_schedule,
                            huber_c=cfg.huber_c)

    def controlled(x, t, hint, context, context_mask=None, **added):      # added: SDXL's pooled text, numbers
        if cfg.kind == "t2i_adapter":          # Mou et al. eq. 4: features of the control image alone, no x_t or t
            return pipe.unet(x, t, context, context_mask, adapter=model(hint), **added)
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
                    save_folder(ema_net, pipe, cfg, folder)
        ckpt.maybe_save(step)

    bar.close()
    with ema_copy(accelerator, model, ema, lambda: None) as ema_net:
        if ema_net is not None:
            layout = save_folder(ema_net, pipe, cfg, folder)
            logger.info("%s folder (%s layout): %s", name, layout, folder)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return folder


if __name__ == "__main__":
    main()
