"""Autoencoder evaluation: held-out reconstructions, PSNR, and the latent scaling factor."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` inside the block, its previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for (B, C, H, W) images in [-1, 1]: 10 log10(2^2 / MSE), shape (B,)."""
    if images.shape != references.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(images.shape)} vs {tuple(references.shape)}")
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(4.0 / mse)  # peak-to-peak 2 on the [-1, 1] scale


@torch.no_grad()
def reconstruct(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Decode each image's posterior mean, clamped to [-1, 1] as it would be shown; on images' device."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for chunk in images.split(batch_size):
            z = model.encode(chunk.to(device)).mode()                # (b, z, H/f, W/f)
            out.append(model.decode(z).float().clamp(-1, 1).to(images.device))
    return torch.cat(out)


def heldout_psnr(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean over images of the per-image PSNR of their reconstructions (dB)."""
    return psnr(reconstruct(model, images, batch_size), images).mean().item()


@torch.no_grad()
def latent_scaling_factor(model: nn.Module, batches: Iterable[torch.Tensor],
                          generator: torch.Generator | None = None) -> float:
    """1 / std of posterior samples over all elements of `batches`.

    Rombach et al. 2022 (sec. 4.3.2, KL-reg. models) rescale latents by 1 / std estimated on
    data, so the diffusion model sees roughly unit-variance inputs whatever the KL weight did.
    """
    device = next(model.parameters()).device
    zs = []
    with eval_mode(model):
        for x in batches:
            posterior = model.encode(x.to(device))
            # Noise drawn on the CPU generator, so the estimate is the same on every device.
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device)
            zs.append((posterior.mean + posterior.std * eps).float().flatten())
    if not zs:
        raise ValueError("latent_scaling_factor: no batches given")
    std = torch.cat(zs).std().item()
    if not std > 0:
        raise ValueError(f"latent_scaling_factor: latents have std {std}; cannot scale by 1/std")
    return 1.0 / std
