"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1).

An image x (B, C, H, W) in [-1, 1] is encoded to a diagonal Gaussian posterior over
latents z (B, z_channels, H/f, W/f), f = 2 ** (len(channel_mult) - 1); the decoder maps z
back to pixels. The diffusion model works on `encode_latents(x) = (z - shift) * scale`.

Layout (parameter names are ours; `convert_ae.py` maps diffusers and CompVis names):
  encoder.conv_in -> encoder.down[i].res[j] (+ down[i].resample) -> encoder.mid
  (res1, attn, res2) -> encoder.norm_out -> encoder.conv_out -> quant_conv -> moments;
  z -> post_quant_conv -> decoder.conv_in -> decoder.mid -> decoder.up[i] (execution
  order: lowest resolution first) -> decoder.norm_out -> decoder.conv_out.

fp16 decoding: the decoder's activations grow along the up path and can pass fp16's
65504 limit (the known SDXL-VAE NaN problem). When `decode` gets fp16 latents it runs
post_quant_conv and the decoder with `fp16_decode_dtype` (fp32 by default, bf16 on request)
copies of the weights and returns fp16 images; "float16" turns the guard off.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm import ops
from ldm.models.vae_tiling import Tiled
from ldm.models.weights import load_state_dict_strict, load_weights  # noqa: F401  (re-exported)

FP16_DECODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class AutoencoderConfig:
    in_channels: int = 3                      # image channels in
    out_channels: int = 3                     # image channels out
    base_channels: int = 128                  # width of the first level; level i has base * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per level; f = 2 ** (levels - 1)
    num_res_blocks: int = 2                   # ResBlocks per encoder level (decoder has one more)
    z_channels: int = 4                       # latent channels
    resolution: int = 256                     # training image size (informational)
    num_groups: int = 32                      # GroupNorm groups everywhere
    mid_attn: bool = True                     # self-attention in the mid-block (the only attention)
    use_quant_conv: bool = True               # 1x1 convs around the latent (absent in some VAEs)
    dropout: float = 0.0                      # inside ResBlocks, before the second conv
    scaling_factor: float = 1.0               # 1 / std of latents measured on data
    shift_factor: float | None = None         # mean of latents subtracted before scaling (SD3 style)
    fp16_decode_dtype: str = "float32"        # compute dtype of `decode` for fp16 latents

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be non-empty positive ints, got {self.channel_mult}")
        for c in [self.base_channels] + [self.base_channels * m for m in self.channel_mult]:
            if c % self.num_groups:
                raise ValueError(f"num_groups={self.num_groups} does not divide channel count {c}")
        if self.fp16_decode_dtype not in FP16_DECODE_DTYPES:
            raise ValueError(f"fp16_decode_dtype must be one of {list(FP16_DECODE_DTYPES)}, "
                             f"got {self.fp16_decode_dtype!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------
# Building blocks.

def conv3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding)


class GroupNorm(nn.Module):
    """GroupNorm (+ optional SiLU) holding `weight`/`bias`, computed by ldm.ops.group_norm."""

    def __init__(self, channels: int, num_groups: int, activation: str | None = "silu", eps: float = 1e-6):
        super().__init__()
        self.num_groups, self.activation, self.eps = num_groups, activation, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps,
                              activation=self.activation)


class ResBlock(nn.Module):
    """x + conv(drop(norm_silu(conv(norm_silu(x))))), with a 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(c_in, num_groups), conv3(c_in, c_out)
        self.norm2, self.conv2 = GroupNorm(c_out, num_groups), conv3(c_out, c_out)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, head_dim = channels, residual."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = GroupNorm(channels, num_groups, activation=None)
        self.q, self.k, self.v, self.proj = (nn.Linear(channels, channels) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                   # (B, HW, C)
        q, k, v = (lin(h).unsqueeze(1) for lin in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = ops.attention(q, k, v).squeeze(1)                         # (B, HW, C)
        return x + self.proj(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom only, so 2n pixels map to exactly n."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3(channels, channels, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3(channels, channels)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: a stack of ResBlocks, then an optional resample (down or up)."""

    def __init__(self, channels: list[tuple[int, int]], cfg: AutoencoderConfig, resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(a, b, cfg.num_groups, cfg.dropout) for a, b in channels)
        self.resample = resample


class MidBlock(nn.Module):
    """ResBlock -> Attention -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, cfg: AutoencoderConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, cfg.num_groups, cfg.dropout)
        self.attn = Attention(channels, cfg.num_groups) if cfg.mid_attn else None
        self.res2 = ResBlock(channels, channels, cfg.num_groups, cfg.dropout)

    def blocks(self) -> list[nn.Module]:
        return [b for b in (self.res1, self.attn, self.res2) if b is not None]


class _Trunk(nn.Module):
    """Shared by Encoder and Decoder: runs blocks, optionally under gradient checkpointing."""

    gradient_checkpointing = False

    def run(self, block: nn.Module, x):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def run_level(self, level: Level, x):
        for block in level.res:
            x = self.run(block, x)
        return x if level.resample is None else level.resample(x)


# ----------------------------------------------------------------------------
# Encoder, posterior, decoder.

class Encoder(_Trunk):
    """Image (B, C, H, W) -> moments (B, 2*z_channels, H/f, W/f) before quant_conv."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = conv3(cfg.in_channels, cfg.base_channels)
        self.down, c = nn.ModuleList(), cfg.base_channels
        for i, w in enumerate(widths):
            pairs = [(c if j == 0 else w, w) for j in range(cfg.num_res_blocks)]
            self.down.append(Level(pairs, cfg, Downsample(w) if i < len(widths) - 1 else None))
            c = w
        self.mid = MidBlock(c, cfg)
        self.norm_out = GroupNorm(c, cfg.num_groups)
        self.conv_out = conv3(c, 2 * cfg.z_channels)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = self.run_level(level, x)
        for block in self.mid.blocks():
            x = self.run(block, x)
        return self.conv_out(self.norm_out(x))


class Decoder(_Trunk):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        c = widths[-1]
        self.conv_in = conv3(cfg.z_channels, c)
        self.mid = MidBlock(c, cfg)
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):                      # lowest resolution first
            w = widths[i]
            pairs = [(c if j == 0 else w, w) for j in range(cfg.num_res_blocks + 1)]
            self.up.append(Level(pairs, cfg, Upsample(w) if i > 0 else None))
            c = w
        self.norm_out = GroupNorm(c, cfg.num_groups)
        self.conv_out = conv3(c, cfg.out_channels)

    def forward(self, z):
        x = self.conv_in(z)
        for block in self.mid.blocks():
            x = self.run(block, x)
        for level in self.up:
            x = self.run_level(level, x)
        return self.conv_out(self.norm_out(x))


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from moments (B, 2*z, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)                  # (B, z, h, w) each
        # The clamp keeps exp() finite early in training (as in LDM).
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements, per sample (B,) (Kingma & Welling 2014, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _call_in_dtype(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """module(x) computed with `dtype` copies of its parameters and input; module is untouched."""
    params = {n: p.to(dtype) for n, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x.to(dtype),))


# ----------------------------------------------------------------------------
# The autoencoder.

class AutoencoderKL(nn.Module):
    """Encoder -> diagonal Gaussian posterior -> Decoder, with save/load and latent scaling."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        z2 = 2 * config.z_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(z2, z2, 1) if config.use_quant_conv else nn.Identity()
        self.post_quant_conv = (nn.Conv2d(config.z_channels, config.z_channels, 1)
                                if config.use_quant_conv else nn.Identity())

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResBlock/Attention in the backward pass to save activation memory."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def encode(self, x: torch.Tensor, tile: int | None = None) -> DiagonalGaussian:
        """tile: the encoder runs in tiles of this many pixels (ldm.models.vae_tiling): the same moments in
        bounded memory; None: untiled."""
        encoder = Tiled(self.encoder, tile) if tile else self.encoder
        return DiagonalGaussian(self.quant_conv(encoder(x)))

    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Latents -> images; fp16 latents are decoded in `config.fp16_decode_dtype` (module doc). tile: in
        tiles of this many pixels (ldm.models.vae_tiling), the same image in bounded memory; None: untiled."""
        decoder = Tiled(self.decoder, tile) if tile else self.decoder
        if z.dtype != torch.float16 or self.config.fp16_decode_dtype == "float16":
            return decoder(self.post_quant_conv(z))
        dtype = FP16_DECODE_DTYPES[self.config.fp16_decode_dtype]
        h = _call_in_dtype(self.post_quant_conv, z, dtype)
        return _call_in_dtype(decoder, h, dtype).to(torch.float16)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                       tile: int | None = None) -> torch.Tensor:
        """Images -> latents at unit scale for the diffusion model: (z - shift) * scale."""
        posterior = self.encode(x, tile)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode_latents(self, z_scaled: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Inverse of the scaling in `encode_latents`, then decode."""
        z = z_scaled / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        return self.decode(z, tile)

    # -- persistence: config.json + model.safetensors ------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        from ldm.models.weights import write_safetensors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        write_safetensors(state, directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "AutoencoderKL":
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
        config = AutoencoderConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        load_weights(model, str(directory / WEIGHTS_NAME), source=str(directory))
        return model.to(device=device, dtype=dtype)
