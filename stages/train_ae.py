"""Stage 1: train the KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1).

    accelerate launch stages/train_ae.py --config configs/ae/shapes64.yaml [--resume latest] [key=value ...]
    python stages/train_ae.py --config configs/ae/shapes64.yaml train.max_steps=100

The story: setup -> data (+ fixed held-out images) -> autoencoder, loss and PatchGAN
discriminator (its own optimizer, active from loss.disc_start) -> prepare -> EMA -> resume ->
loop (accumulate, non-finite guard, update, log, validate: held-out PSNR and an originals vs
reconstructions grid, checkpoint) -> measure the latent scaling factor -> save the final
autoencoder (EMA weights when enabled) to <train.output_dir>/autoencoder/.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.data.loaders import DataConfig, build_dataset, check_image_multiple, make_dataloader
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.losses_ae import AELossConfig, AutoencoderLoss, hinge_d_loss
from ldm.training import (EMA, Checkpointer, NonFiniteGuard, ProgressBar, TrainConfig,
                          build_optimizer, build_scheduler, log_images, one_batch_size,
                          optimizer_step, parse_args, setup)
from ldm.training.ae_eval import heldout_psnr, latent_scaling_factor, psnr, reconstruct

logger = logging.getLogger("train_ae")
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "ae" / "shapes64.yaml")


@dataclass
class AEStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AELossConfig = field(default_factory=AELossConfig)
    val_images: int = 64          # held-out images for PSNR (the first 8 go in the PNG grid)
    val_path: str = ""            # held-out source for non-shapes data ("" = first val_images of data.path)
    scale_batches: int = 8        # training batches whose latent std sets model.scaling_factor

    def __post_init__(self):
        self.data = one_batch_size(self.data, self.train)
        check_image_multiple(self.data, self.model.downsample_factor, "the autoencoder's factor, model.channel_mult")
        if self.loss.disc_weight > 0 and self.train.mixed_precision == "fp16":
            raise ValueError("train.mixed_precision=fp16 with loss.disc_weight > 0: one fp16 grad "
                             "scaler cannot serve two optimizers; use bf16")
        for key in ("val_images", "scale_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


def heldout_images(cfg: AEStageConfig) -> torch.Tensor:
    """(N, 3, R, R) fixed held-out images: the shapes held-out split, or val_path's first N."""
    if cfg.data.source == "shapes":
        val = dataclasses.replace(cfg.data, split="heldout", length=cfg.val_images)
    else:
        val = dataclasses.replace(cfg.data, path=cfg.val_path or cfg.data.path, crop="center", buckets=False)
    dataset = build_dataset(val)
    n = min(cfg.val_images, len(dataset))
    return torch.stack([dataset[i]["pixel_values"] for i in range(n)])


def scale_images(cfg: AEStageConfig) -> list[torch.Tensor]:
    """The first scale_batches training batches, read from a fresh data set (the loader's position is untouched)."""
    dataset = build_dataset(dataclasses.replace(cfg.data, crop="center", buckets=False))  # square: they stack
    bs = cfg.train.batch_size
    n = min(cfg.scale_batches * bs, len(dataset))
    images = torch.stack([dataset[i]["pixel_values"] for i in range(n)])
    return list(images.split(bs))


def reseed(noise: torch.Generator, seed: int, rank: int, position: dict) -> torch.Generator:
    """Key the posterior noise on (seed, rank, data position), not on the global RNG.

    Starting a DataLoader iterator draws from the global RNG, and a resumed run starts one
    where an uninterrupted run does not; noise keyed on the batch is the same in both.
    """
    key = np.random.SeedSequence([seed, rank, position["epoch"], position["batch"]])
    return noise.manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))


@torch.no_grad()
def validate(accelerator, model, ema, images, step, cfg) -> None:
    """Held-out PSNR with the EMA weights, and a grid: originals (top row) over reconstructions."""
    net = accelerator.unwrap_model(model)
    with ema.swapped() if ema is not None else torch.no_grad():
        recon = reconstruct(net, images, cfg.train.batch_size)               # (N, 3, R, R)
    value = psnr(recon, images).mean().item()
    n = min(8, len(images))
    log_images(accelerator, torch.cat([images[:n], recon[:n]]), step, tag="val/reconstructions",
               output_dir=cfg.train.output_dir, nrow=n)
    accelerator.log({"val/psnr": value}, step=step)
    logger.info("step %d: held-out PSNR %.2f dB", step, value)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(AEStageConfig, __doc__, DEFAULT_CONFIG, argv)
    accelerator = setup(cfg.train, cfg, project="ae")
    out_dir = Path(cfg.train.output_dir)

    # ---- data: an endless, resumable training stream and a fixed held-out set
    data = make_dataloader(cfg.data, accelerator)
    val_images = heldout_images(cfg) if accelerator.is_main_process else None

    # ---- model, loss and the discriminator with its own optimizer
    model = AutoencoderKL(cfg.model)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    loss_fn = AutoencoderLoss(cfg.loss, cfg.model.out_channels).to(accelerator.device)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)  # not prepared: stepped once per update
    disc = loss_fn.discriminator                      # None when loss.disc_weight == 0
    extras = {}
    if disc is not None:
        d_optimizer = build_optimizer(disc, cfg.train)
        d_scheduler = build_scheduler(d_optimizer, cfg.train)
        disc, d_optimizer = accelerator.prepare(disc, d_optimizer)
        extras = {"discriminator": disc, "disc_optimizer": d_optimizer, "disc_scheduler": d_scheduler}
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)
    ema = EMA(net, cfg.train.ema_decay, cfg.train.ema_power) if cfg.train.ema_decay > 0 else None

    # ---- resume (restores the RNG last), then the loop
    ckpt = Checkpointer(accelerator, cfg.train, stage="ae", model_config=cfg.model, config=cfg,
                        model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, data=data,
                        extras=extras)
    step = ckpt.resume()
    guard, d_guard = NonFiniteGuard(cfg.train.max_nonfinite), NonFiniteGuard(cfg.train.max_nonfinite)
    bar = ProgressBar(accelerator, cfg.train.max_steps, initial=step)
    batches = data.forever()  # starts at the restored position on its first batch
    noise = torch.Generator(accelerator.device)

    model.train()
    while step < cfg.train.max_steps:
        x = next(batches)["pixel_values"].to(accelerator.device)            # (B, 3, R, R)
        reseed(noise, cfg.train.seed, accelerator.process_index, data.state_dict())
        gan = loss_fn.gan_active(step)
        with accelerator.accumulate(*([model, disc] if disc is not None else [model])):
            x_rec, posterior = model(x, generator=noise)
            if disc is not None:  # D is a fixed critic in the generator's loss
                accelerator.unwrap_model(disc).requires_grad_(False)
            loss, logs = loss_fn.generator_loss(x, x_rec, posterior, step,
                                                last_layer=net.decoder.conv_out.weight)
            guard.observe(loss)
            accelerator.backward(loss)
            if gan:  # hinge loss through the prepared D, so DDP averages its gradients
                accelerator.unwrap_model(disc).requires_grad_(True)
                d_loss = hinge_d_loss(disc(x), disc(x_rec.detach()))
                d_guard.observe(d_loss)
                accelerator.backward(d_loss)
            update = None
            if accelerator.sync_gradients:
                update = optimizer_step(accelerator, model, optimizer, scheduler, guard,
                                        max_grad_norm=cfg.train.max_grad_norm, ema=ema)
                if gan:
                    d_update = optimizer_step(accelerator, disc, d_optimizer, d_scheduler, d_guard,
                                              max_grad_norm=cfg.train.max_grad_norm)
                    if d_update is not None:
                        logs["d_loss"] = torch.tensor(d_update.loss)
        if update is None:  # mid-accumulation, or a skipped (non-finite) update
            continue

        step += 1
        bar.update(update)
        if step % cfg.train.log_every == 0:
            accelerator.log({**update.metrics(), **{f"train/{k}": float(v) for k, v in logs.items()},
                             "train/skipped": guard.total_skipped}, step=step)
        if cfg.train.validate_every > 0 and step % cfg.train.validate_every == 0 \
                and accelerator.is_main_process:
            validate(accelerator, model, ema, val_images, step, cfg)
        ckpt.maybe_save(step)
    bar.close()

    # ---- final model: EMA weights, latent scaling factor measured on training data
    result = {"step": step}
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to()
        scale = latent_scaling_factor(net, scale_images(cfg),
                                      torch.Generator().manual_seed(cfg.train.seed))
        net.config = dataclasses.replace(net.config, scaling_factor=scale)
        val_psnr = heldout_psnr(net, val_images, cfg.train.batch_size)
        net.save_pretrained(out_dir / "autoencoder")
        result.update(psnr=val_psnr, scaling_factor=scale, val_images=len(val_images))
        (out_dir / "final_metrics.json").write_text(json.dumps(result, indent=2))
        logger.info("saved %s: held-out PSNR %.2f dB over %d images, scaling_factor %.4f",
                    out_dir / "autoencoder", val_psnr, len(val_images), scale)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
