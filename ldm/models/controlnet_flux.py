"""ControlNets for FLUX.1 (Zhang et al. 2023's idea on a transformer), as InstantX and Shakker-Labs share them in
diffusers' `FluxControlNetModel` layout:

    python -m ldm.txt2img "a house" --model models/flux-dev --controlnet InstantX/FLUX.1-dev-Controlnet-Canny \
        --control-image edges.png --control-scale 0.7 [--control-mode 0]   # --control-mode: Union ControlNets

- The copy: Flux's own embeddings and a few double- and single-stream blocks (ldm.models.flux's DoubleBlock and
  SingleBlock), no output layer. The control image enters as its autoencoder latents, packed into 2 x 2 tokens like
  x, through a zero-initialised Linear (diffusers' controlnet_x_embedder) added to x's tokens.
- Union ControlNets (num_mode): the mode (canny, tile, depth, ...) is one learnt token put before the text tokens.
- Outputs: every block's image tokens through its own zero-initialised Linear, times the conditioning scale; Flux
  adds the i-th double (single) residual after its block j = i * k, ..., (i + 1) k - 1 with
  k = ceil(blocks / residuals) (`Flux.forward(control=...)`).
- Guidance-distilled (-dev) ControlNets take the guidance scale too, as the base net does.

XLabs' ControlNets (a conv stack on the image, residuals repeated cyclically) are refused by name.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.models.controlnet import ControlledTransformer, acting
from ldm.models.convert_flux import diffusers_to_ours, flux_config_from_diffusers
from ldm.models.flux import PATCH, Flux, FluxConfig, pack, position_ids, rope_angles

CLASS_NAME = "FluxControlNetModel"
_KEYS = {"controlnet_x_embedder.": "hint_embed.", "controlnet_blocks.": "zero_double.",
         "controlnet_single_blocks.": "zero_single.", "controlnet_mode_embedder.": "mode_embed."}


class FluxControlNet(nn.Module):
    """forward(x, t, context, hint latents, pooled, guidance, mode) -> (double residuals, single residuals)."""

    def __init__(self, cfg: FluxConfig, num_mode: int | None = None):
        super().__init__()
        self.cfg, self.num_mode = cfg, num_mode
        body = Flux(cfg)                                 # the copy's embeddings and blocks; no output layer
        del body.final_mod, body.proj_out
        self.body = body
        D = cfg.width
        self.hint_embed = nn.Linear(cfg.in_channels * PATCH * PATCH, D)        # on packed control latents
        self.zero_double = nn.ModuleList(nn.Linear(D, D) for _ in range(cfg.depth_double))
        self.zero_single = nn.ModuleList(nn.Linear(D, D) for _ in range(cfg.depth_single))
        self.mode_embed = nn.Embedding(num_mode, D) if num_mode is not None else None

    def check_base(self, net) -> None:
        """ValueError unless `net` is a Flux this ControlNet was made for (its width and text widths)."""
        if not isinstance(net, Flux):
            raise ValueError(f"a FLUX.1 ControlNet (FluxControlNetModel) needs a FLUX.1 model; this model's network "
                             f"is {type(net).__name__}")
        ours, theirs = self.cfg, net.cfg
        keys = ("width", "in_channels", "context_dim", "pooled_dim", "axes_dims_rope")
        if any(getattr(ours, k) != getattr(theirs, k) for k in keys):
            raise ValueError("this FLUX.1 ControlNet was made for another transformer: "
                             + ", ".join(f"{k} {getattr(ours, k)} vs the model's {getattr(theirs, k)}" for k in keys))
        if ours.guidance_embeds and not theirs.guidance_embeds:
            raise ValueError("a FLUX.1-dev ControlNet (it takes the guidance scale) on a model without the guidance "
                             "input (FLUX.1-schnell): not supported")

    def hint_latents(self, image: torch.Tensor, autoencoder) -> torch.Tensor:
        """Control image (B, 3, H, W) in [0, 1] -> its scaled latents (posterior mode), as x's."""
        return autoencoder.encode_latents(image * 2 - 1, sample=False)

    def forward(self, x, t, context, hint, pooled, guidance=None, mode=None, context_mask=None):
        """x, hint (B, C, H, W) latents, t (B,) = 1000 sigma, context (B, L, D_ctx), pooled (B, P), guidance (B,)
        (-dev only), mode (B,) long (Union only), context_mask (B, L) bool or None -> two lists of (B, N, D)."""
        body = self.body
        body._check_inputs(x, context, context_mask, pooled, None, None, guidance, None)
        if (mode is None) != (self.mode_embed is None):
            raise ValueError("a Union FLUX.1 ControlNet needs its control mode (--control-mode), and only it takes one")
        dtype = body.patch_embed.weight.dtype
        B, _, H, W = x.shape
        c = body._conditioning(t, guidance, pooled, None, B, dtype)
        h = body.patch_embed(pack(x.to(dtype))) + self.hint_embed(pack(hint.to(dtype)))   # (B, N, D)
        ctx = body.context_embed(context.to(dtype))                                         # (B, L, D)
        if self.mode_embed is not None:                      # Union: the mode token goes before the text
            mode = torch.as_tensor(mode, device=x.device).reshape(-1).expand(B)
            ctx = torch.cat([self.mode_embed(mode)[:, None].to(dtype), ctx], dim=1)
            if context_mask is not None:
                context_mask = torch.cat([context_mask.new_ones(B, 1), context_mask], dim=1)
        L = ctx.shape[1]
        rope = rope_angles(position_ids(L, H // PATCH, W // PATCH, x.device), self.cfg.axes_dims_rope,
                           self.cfg.rope_theta)
        mask = None
        if context_mask is not None:
            mask = torch.cat([context_mask.bool(), context_mask.new_ones(B, h.shape[1], dtype=torch.bool)], dim=1)
        double = []
        for block, zero in zip(body.double_blocks, self.zero_double):
            h, ctx = body._run(block, h, ctx, c, rope, mask)
            double.append(zero(h))
        h = torch.cat([ctx, h], dim=1)
        single = []
        for block, zero in zip(body.single_blocks, self.zero_single):
            h = body._run(block, h, c, rope, mask)
            single.append(zero(h[:, L:]))                    # image tokens only
        return double, single

    @staticmethod
    def attach(net, controls: list, autoencoder, active=None) -> "ControlledFlux":
        """`net` (the FLUX.1 teacher, maybe wrapped) with controls [(FluxControlNet, image in [0, 1], scale[,
        mode]), ...] attached, their images encoded once here; `active`: as ControlledUNet's."""
        bound = []
        ae = next(autoencoder.parameters())
        for net_c, image, scale, *mode in controls:
            with torch.no_grad():
                latents = net_c.hint_latents(image.to(ae.device, ae.dtype), autoencoder)
            bound.append((net_c, latents, float(scale), mode[0] if mode else None))
        return ControlledFlux(net, bound, active)


class ControlledFlux(ControlledTransformer):
    """A Flux with FLUX.1 ControlNets attached: forward like Flux's; each (controlnet, latents (1 or B, C, h, w),
    scale, mode) adds scale x its residuals (several: summed, as diffusers' FluxMultiControlNetModel) at the t
    where `active` (ldm.models.controlnet.ControlSteps, or None: all t) says it acts. cond_half: x is CFG's
    [cond; uncond] batch and the ControlNets run on the conditional half only, both halves taking its residuals, as
    diffusers' FluxControlNetPipeline does with true_cfg_scale (set by TextToImage under CFG)."""
    cond_half = False

    def forward(self, x, t, context, context_mask=None, cond_emb=None, pooled=None, guidance=None, **added):
        double, single, dtype = [], [], next(self.net.parameters()).dtype   # fp32 ControlNets on a bf16 net add bf16
        n = x.shape[0] // 2 if self.cond_half else x.shape[0]
        half = lambda v: v[:n] if torch.is_tensor(v) and v.ndim and v.shape[0] == x.shape[0] else v   # noqa: E731
        for net, (hint, scale, mode), on in zip(self.nets, self.controls, acting(self.active, t, len(self.nets))):
            if not on:
                continue
            hint = hint.to(x.device).repeat(n // hint.shape[0], 1, 1, 1)            # the samples share it
            d, s = net(x[:n], half(t), context[:n], hint, half(pooled),
                       half(guidance) if net.cfg.guidance_embeds else None, half(mode), half(context_mask))
            d, s = [(r * scale).to(dtype) for r in d], [(r * scale).to(dtype) for r in s]
            if double or single:
                if (len(d), len(s)) != (len(double), len(single)):
                    raise ValueError("several FLUX.1 ControlNets must have as many blocks each to add up")
                d, s = [a + b for a, b in zip(double, d)], [a + b for a, b in zip(single, s)]
            double, single = d, s
        if self.cond_half:
            double, single = [torch.cat([r, r]) for r in double], [torch.cat([r, r]) for r in single]
        return self.net(x, t, context, context_mask, cond_emb, control=(double, single), pooled=pooled,
                        guidance=guidance, **added)


def load_flux_controlnet(path: str, d: dict, state: dict) -> FluxControlNet:
    """A FluxControlNetModel from its config.json dict `d` and diffusers-named weights `state`."""
    from ldm.models.weights import load_state_dict_strict, split_renamed
    if d.get("conditioning_embedding_channels") is not None:
        raise ValueError(f"{path}: an XLabs-style FLUX.1 ControlNet (conditioning_embedding_channels, a conv stack on "
                         "the image): not supported, InstantX / Shakker-Labs ones are")
    body = {k: v for k, v in d.items() if k not in ("_class_name", "num_mode", "conditioning_embedding_channels")}
    net = FluxControlNet(flux_config_from_diffusers(body), d.get("num_mode"))
    # its own layers by _KEYS; the copy of the base transformer's blocks in that transformer's names
    load_state_dict_strict(net, split_renamed(state, _KEYS, diffusers_to_ours, "body."), path)
    return net
