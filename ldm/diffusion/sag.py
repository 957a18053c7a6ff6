"""Self-attention guidance (SAG; Hong, Lee, Jang & Kim, ICCV 2023, arXiv 2210.00939) as a model wrapper beside CFG.

Blur guidance moves a prediction away from the model's prediction on a blurred x0-hat; SAG blurs only where the
network's self-attention looks most (its mask), so the guidance sharpens what the model attends to. With CFG, as
diffusers' StableDiffusionSAGPipeline and the paper's Stable Diffusion code do it (the paper's SAG equation with the
unconditional prediction as the unguided one, which diffusers cites as eqs. 16 and 25), per sampler call at x_t:

    eps_u, x0_u   = the unconditional prediction (the conditional one at w = 0) and its x0-hat
    M             = the middle block's self-attention map of that pass, summed over queries, mean over heads, > 1
    x0_deg        = M * blur(x0_u) + (1 - M) * x0_u           (Gaussian, 9 taps, sigma 1: diffusers' gaussian_blur_2d)
    x_deg         = alpha_t x0_deg + sigma_t eps_u            (renoised with the predicted noise)
    eps_guided    = eps_cfg + s (eps_u - eps(x_deg, uncond))

In x0-hat (what our model functions return) the same is D_cfg + s (x0_deg - D(x_deg)): x_deg and x0_deg share eps_u,
so x0_deg - D(x_deg) = -(sigma / alpha)(eps_u - eps(x_deg)), the eps term's share of x0-hat. Written so it needs the
schedule's alpha and sigma only to renoise (x_deg = x_t + alpha (x0_deg - x0_u)) and holds for any parameterization
of the net. For an eps net it is diffusers' result; for a v net diffusers adds s (v_u - v(x_deg)) to v instead,
which differs from the paper's eps form by sigma^2 s (x0_u - x0_deg) in x0-hat: ours is the paper's eps form, as
ComfyUI's SelfAttentionGuidance node (on which the A1111/Forge SAG builds) computes it.

One more U-Net call a step (of B samples, unconditional); s = 0 is plain CFG. Caution: the mask is coarse, the
middle block's resolution (SD: 8 x 8 at 512 px; shapes64: 4 x 4), nearest-upsampled to the latent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .guidance import _batched_args, is_per_sample
from .param import append_dims

BLUR_SIGMA = 1.0      # diffusers' and the A1111 SAG extension's default (the paper's ADM runs used 3 and 9 on pixels)
BLUR_TAPS = 9         # kernel side, as diffusers' gaussian_blur_2d (reflect padding: latents need sides > 4)
THRESHOLD = 1.0       # attention received above the tokens' average (which is 1)


def gaussian_blur(x: torch.Tensor, sigma: float = BLUR_SIGMA, taps: int = BLUR_TAPS) -> torch.Tensor:
    """(B, C, H, W) blurred per channel by a taps x taps Gaussian of std `sigma` (in latent pixels), normalised to
    sum 1, the borders reflected (torchvision's gaussian_blur, diffusers' gaussian_blur_2d)."""
    if not sigma > 0 or taps % 2 == 0:
        raise ValueError(f"a Gaussian blur needs sigma > 0 and an odd kernel side; got sigma={sigma}, taps={taps}")
    if min(x.shape[-2:]) <= taps // 2:
        raise ValueError(f"SAG's {taps}-tap blur reflects {taps // 2} latent pixels at the borders; these latents are "
                         f"{x.shape[-2]}x{x.shape[-1]}")
    offsets = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).to(x).expand(x.shape[1], 1, taps, taps)   # (C, 1, k, k), one per channel
    padded = F.pad(x, [taps // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=x.shape[1])


def attention_mask(received: torch.Tensor, size: tuple[int, int], threshold: float = THRESHOLD) -> torch.Tensor:
    """(B, 1, H, W) float 0/1: where the tokens of `received` (B, h, w; `unet.attention_received`) get more than
    `threshold`, nearest-upsampled to the latent's `size`, as diffusers' sag_masking."""
    return F.interpolate((received > threshold)[:, None].float(), size=tuple(size), mode="nearest")


def sag(model, w, scale, uncond: dict, attention, schedule, blur_sigma: float = BLUR_SIGMA,
        threshold: float = THRESHOLD):
    """Model function (x, t, **extra_args) -> (1 + w) D(cond) - w D(uncond) + s (x0_deg - D(x_deg, uncond)): CFG with
    self-attention guidance (module docstring). model: x0-hat (a `Denoiser`) on `schedule` (its t, alpha_sigma).
    attention: () -> a context manager yielding a list to which each net call within it appends its map (B, h, w)
    (ldm.models.unet.recorded_attention bound to the U-Net). Two calls: [cond; uncond] (2B; B at w = 0, the cond
    half then the unguided one, as diffusers), then the degraded x (B) with `uncond` (cond at w = 0). w, scale:
    floats or per-sample (B,) tensors (a tensor w runs CFG's 2B pass and takes the uncond map for every sample)."""
    with_uncond = torch.is_tensor(w) or w != 0

    def guided(x, t, **extra_args):
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        args = _batched_args(extra_args, uncond, batch) if with_uncond else extra_args
        with attention() as maps:
            if with_uncond:
                out = model(torch.cat([x, x]), t if t.ndim == 0 else torch.cat([t, t]), **args)
                pred_cond, base = out[:batch], out[batch:]
            else:
                pred_cond = base = model(x, t, **args)
        if len(maps) != 1:
            raise RuntimeError(f"self-attention guidance expected one U-Net call to record its map, got {len(maps)}")
        mask = attention_mask(maps[0][-batch:], x.shape[-2:], threshold).to(base.dtype)     # the unguided half's
        degraded = mask * gaussian_blur(base, blur_sigma) + (1 - mask) * base              # x0_deg
        alpha = append_dims(schedule.alpha_sigma(t)[0].to(device=x.device, dtype=base.dtype), x.ndim)
        x_deg = x + alpha * (degraded - base)      # alpha x0_deg + sigma eps_u, since x = alpha x0_u + sigma eps_u
        if with_uncond:                             # the uncond half of the CFG arguments
            args = {k: v[batch:] if is_per_sample(v, 2 * batch) else v for k, v in args.items()}
        s = append_dims(torch.as_tensor(scale, dtype=base.dtype, device=x.device), x.ndim)
        out = pred_cond + s * (degraded - model(x_deg, t, **args))
        if with_uncond:
            wt = append_dims(torch.as_tensor(w, dtype=base.dtype, device=x.device), x.ndim)
            out = out + wt * (pred_cond - base)
        return out
    return guided
