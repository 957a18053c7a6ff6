"""Training losses of the KL autoencoder (Rombach et al. 2022, Sec. 3.1 and App. G).

generator loss = rec + kl_weight * KL + lambda * disc_weight * (-D(x_rec))      once step >= disc_start
discriminator loss = hinge(D(x), D(x_rec))                                     once step >= disc_start

rec is L1 or L2 per pixel (+ perceptual_weight * an LPIPS-like distance, broadcast to every pixel
as in LDM), summed over pixels and averaged over the batch; KL is summed over latent elements.
Those sums are why kl_weight ~ 1e-6 is the usual value. lambda is VQGAN's adaptive weight.
The perceptual network is only ever read from a local file the user names; nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder import DiagonalGaussian, load_state_dict_strict

RECONSTRUCTIONS = ("l1", "l2")


@dataclass
class AELossConfig:
    reconstruction: str = "l1"          # "l1" | "l2" per-pixel distance
    kl_weight: float = 1e-6             # small: latents stay close to an image-like code, not N(0, I)
    disc_weight: float = 0.5            # scales the adaptive GAN weight; 0 turns the GAN off
    disc_start: int = 50001             # optimizer step at which the GAN terms switch on
    disc_layers: int = 3                # PatchGAN depth: receptive field 70 px for 3
    disc_channels: int = 64             # PatchGAN width of the first layer
    perceptual_weight: float = 0.0      # 0 = off; LDM uses 1.0 with LPIPS
    perceptual_net: str | None = None   # local file: VGG16-features .safetensors, .pt2 or TorchScript

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}")
        if self.perceptual_weight > 0 and not self.perceptual_net:
            raise ValueError("perceptual_weight > 0 needs perceptual_net: a local feature-network file")


# ----------------------------------------------------------------------------
# PatchGAN discriminator and the GAN terms.

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, Sec. 3.2.2): a grid of real/fake logits, one per image patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers, c = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for n in range(1, num_layers + 1):
            c_next = channels * min(2 ** n, 8)
            stride = 2 if n < num_layers else 1                       # the last hidden layer keeps resolution
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, x):
        return self.net(x)                                            # (B, 1, h, w) logits


def _dcgan_init(m: nn.Module) -> None:
    # N(0, 0.02) weights as in DCGAN (Radford et al. 2016, Sec. 4), which pix2pix keeps.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, delta: float = 1e-4) -> torch.Tensor:
    """VQGAN's lambda (Esser et al. 2021, Eq. 7): |grad rec| / (|grad gan| + delta) at the last layer, clamped."""
    grad_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    grad_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    # delta = 1e-4 (LDM's value, the paper writes 1e-6); no gradient flows through lambda.
    return (grad_rec.norm() / (grad_gan.norm() + delta)).clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------
# Perceptual distance from a user-supplied feature network.

VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG16_TAPS = (3, 8, 15, 22, 29)                                      # relu1_2 ... relu5_3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    """VGG16 conv trunk (Simonyan & Zisserman 2015), indexed like torchvision's `vgg16().features`."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, item, 3, padding=1), nn.ReLU()]
                c = item
        self.layers = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        """Images in [-1, 1] -> the five ReLU feature maps LPIPS uses."""
        x, feats = ((x + 1) / 2 - self.mean) / self.std, []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in VGG16_TAPS:
                feats.append(x)
        return feats


def load_feature_net(path: str | Path) -> nn.Module:
    """VGG16-features .safetensors, torch.export .pt2 or TorchScript file -> frozen feature net."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual_net file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = {k.removeprefix("features."): v for k, v in load_file(str(path)).items()}
        net = VGG16Features()
        load_state_dict_strict(net.layers, state, source=str(path))
    elif path.suffix == ".pt2":
        net = torch.export.load(str(path)).module()
    elif path.suffix in (".pt", ".pth", ".ts", ".jit"):
        net = torch.jit.load(str(path), map_location="cpu")
    else:
        raise ValueError(f"perceptual_net {path}: expected .safetensors (VGG16 features), "
                         ".pt2 (torch.export) or a TorchScript file (.pt/.pth/.ts/.jit)")
    if path.suffix != ".pt2":                                        # export froze train/eval already
        net.eval()
    for p in net.parameters():                                        # ScriptModules lack requires_grad_()
        p.requires_grad_(False)
    return net


class PerceptualDistance(nn.Module):
    """LPIPS-like distance (Zhang et al. 2018, Eq. 1) with unit layer weights: (B,) per pair."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net                                                # images in [-1, 1] -> feature maps

    def forward(self, x, y):
        fx, fy = self.net(x), self.net(y)
        fx, fy = ([fx], [fy]) if torch.is_tensor(fx) else (fx, fy)
        dist = 0.0
        for a, b in zip(fx, fy):                                      # (B, C_l, H_l, W_l)
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)             # unit-normalise channels, as LPIPS
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            dist = dist + (a - b).pow(2).sum(dim=1).mean(dim=(1, 2))
        return dist


# ----------------------------------------------------------------------------
# The loss module the training loop calls.

class AutoencoderLoss(nn.Module):
    """Owns the discriminator (and the optional perceptual net); two calls per step, G then D."""

    def __init__(self, config: AELossConfig, image_channels: int = 3):
        super().__init__()
        self.config = config
        self.discriminator = (PatchDiscriminator(image_channels, config.disc_channels, config.disc_layers)
                              if config.disc_weight > 0 else None)
        self.perceptual = (PerceptualDistance(load_feature_net(config.perceptual_net))
                           if config.perceptual_weight > 0 else None)

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.disc_start

    def generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, posterior: DiagonalGaussian,
                       step: int, last_layer: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Autoencoder loss; last_layer is the decoder's final weight (`model.decoder.conv_out.weight`)."""
        cfg, B = self.config, x.shape[0]
        diff = x - x_rec
        rec = diff.abs() if cfg.reconstruction == "l1" else diff.pow(2)   # (B, C, H, W)
        if self.perceptual is not None:
            rec = rec + cfg.perceptual_weight * self.perceptual(x, x_rec).view(B, 1, 1, 1)
        rec_loss = rec.sum() / B
        kl_loss = posterior.kl().mean()
        loss = rec_loss + cfg.kl_weight * kl_loss
        logs = {"rec_loss": rec_loss.detach(), "kl_loss": kl_loss.detach()}
        if self.gan_active(step):
            g_loss = -self.discriminator(x_rec).mean()
            # lambda needs the graph; in eval (no grad) the GAN term is simply left out.
            lam = adaptive_weight(rec_loss, g_loss, last_layer) if torch.is_grad_enabled() else 0.0
            loss = loss + cfg.disc_weight * lam * g_loss
            logs.update(g_loss=g_loss.detach(), adaptive_weight=torch.as_tensor(lam))
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Hinge loss of D on real vs reconstructed (detached) images; 0 before disc_start."""
        if not self.gan_active(step):
            return torch.zeros((), device=x.device), {}
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(),
                        "logits_fake": logits_fake.mean().detach()}
