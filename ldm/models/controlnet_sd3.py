"""ControlNets for SD3 and SD 3.5 (Zhang et al. 2023's idea on the MMDiT), as InstantX, Stability and alimama share
them in diffusers' `SD3ControlNetModel` layout:

    python -m ldm.txt2img "a house" --model models/sd3 --controlnet InstantX/SD3-Controlnet-Canny \
        --control-image edges.png --control-scale 0.7

Two kinds (`stream`), told apart by the config:
- "joint" (InstantX's, alimama's): a copy of the MMDiT's patch and position embedding, time, pooled-text and text
  embeddings and its first joint blocks (ldm.models.mmdit.JointBlock), every one with both streams (no last-block
  special case), no output layer.
- "image" (SD 3.5 Large's blur / canny / depth; use_pos_embed false, joint_attention_dim null): no text at all. x's
  tokens come through the base MMDiT's own patch embedding and position table (diffusers' pipeline copies them in;
  we share them, bound by `check_base`), then its own time and pooled-text embedding and image-only blocks
  (`ImageBlock`, diffusers' SD3SingleTransformerBlock).
Both: the control image enters as its autoencoder latents through a zero-initialised patch embedding without
positions (diffusers' pos_embed_input), added to x's tokens; every block's image tokens go out through their own
zero-initialised Linear, times the conditioning scale; the MMDiT adds them after its blocks but the last
(`MMDiT.forward(control=...)`, residual j after blocks j n / k .. (j + 1) n / k of n for k of them).
- `force_zeros_for_pooled_projection` (InstantX's, the default): the copy sees an all-zero pooled text and
  control latents without the autoencoder's shift, as diffusers' StableDiffusion3ControlNetPipeline gives them.
- Inpainting (alimama's SD3-Controlnet-Inpainting, extra_conditioning_channels 1): the control is the image with
  the part to repaint set to black, as latents (with the shift), and the mask to keep (1 - mask) on the latent grid:
  its "image" is RGB + the repaint mask (B, 4, H, W) in [0, 1] (`inpaint_control`), and it sees a zero pooled text
  (StableDiffusion3ControlNetInpaintingPipeline). ldm.inpaint draws with it from pure noise, as that pipeline does.

Stability's own single files of SD 3.5 Large's (stabilityai/stable-diffusion-3.5-controlnets,
sd3.5_large_controlnet_*.safetensors) load too (`load_original_sd3_controlnet`): their names as diffusers'
scripts/convert_sd3_controlnet_to_diffusers.py maps them, the config read off the tensors (heads of 64).

Refused by name: other mixes of use_pos_embed / joint_attention_dim, pos_embed_type other than sincos, and mask
channels other than 1.
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from ldm import ops
from ldm.models.controlnet import ControlledTransformer, acting
from ldm.models.convert_mmdit import SD3_HEAD_DIM, diffusers_to_ours, mmdit_config_from_diffusers
from ldm.models.layers import TimestepMLP, timestep_embedding
from ldm.models.mmdit import TIME_FREQS, JointBlock, MMDiT, MMDiTConfig, Stream, layer_norm, merge_heads, modulate

CLASS_NAME = "SD3ControlNetModel"
STREAMS = ("joint", "image")
_KEYS = {"pos_embed_input.proj.": "hint_embed.", "controlnet_blocks.": "zero."}
_OURS_ONLY = ("_class_name", "extra_conditioning_channels", "pos_embed_type", "use_pos_embed",
              "force_zeros_for_pooled_projection")


class ImageBlock(nn.Module):
    """One stream of a joint block alone (diffusers' SD3SingleTransformerBlock): adaLN-Zero, self-attention over the
    image tokens (no q/k norm), MLP; its weights under `image.` as a JointBlock's image half."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.image = Stream(width, heads, None)

    def forward(self, x, c):
        """x (B, N, D), c (B, D) -> (B, N, D)."""
        m = self.image.modulation(c)           # shift, scale, gate (attention), same (MLP)
        q, k, v = self.image.attn.qkv(modulate(layer_norm(x), m[0], m[1]))
        return self.image.finish(x, merge_heads(ops.attention(q, k, v)), *m[2:6])


class ImageStream(nn.Module):
    """SD 3.5 Large's ControlNet body: time and pooled-text embedding (as the MMDiT's) and image-only blocks."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.time_embed = TimestepMLP(TIME_FREQS, cfg.width)
        self.pooled_embed = TimestepMLP(cfg.pooled_dim, cfg.width)
        self.blocks = nn.ModuleList(ImageBlock(cfg.width, cfg.num_heads) for _ in range(cfg.depth))

    def conditioning(self, t, pooled, batch: int, dtype):
        """c = MLP(sinusoid(t)) + MLP(pooled), (B, D)."""
        t = torch.as_tensor(t, device=pooled.device).reshape(-1).expand(batch)
        return self.time_embed(timestep_embedding(t, TIME_FREQS).to(dtype)) + self.pooled_embed(pooled.to(dtype))


class SD3ControlNet(nn.Module):
    """forward(x, t, context, hint latents, pooled, context_mask=None) -> one residual (B, N, D) per block.
    stream: "joint" or "image" (module docstring); mask_channels: 1 for an inpainting ControlNet, else 0."""

    def __init__(self, cfg: MMDiTConfig, zero_pooled: bool = True, stream: str = "joint", mask_channels: int = 0):
        super().__init__()
        if stream not in STREAMS:
            raise ValueError(f"SD3ControlNet stream must be one of {STREAMS}, got {stream!r}")
        self.cfg, self.stream, self.mask_channels = cfg, stream, mask_channels
        self.zero_pooled = zero_pooled or bool(mask_channels)   # the inpainting pipeline zeroes it whatever the flag
        if stream == "joint":
            body = MMDiT(cfg)                               # the copy's embeddings and blocks; no output layer
            body.blocks[-1] = JointBlock(cfg.width, cfg.num_heads, cfg.qk_norm, last=False,
                                         dual=cfg.depth - 1 in cfg.dual_attention_layers)   # its text stream goes on
            del body.final_mod, body.proj_out
        else:
            body = ImageStream(cfg)
        self.body = body
        p = cfg.patch_size
        self.hint_embed = nn.Conv2d(cfg.in_channels + mask_channels, cfg.width, p, stride=p)   # no position table
        self.zero = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth))
        self._base = ()          # "image": (the base MMDiT,) whose patch embedding and positions x's tokens take

    def check_base(self, net) -> None:
        """ValueError unless `net` is an MMDiT this ControlNet was made for (width, patches, text widths); an "image"
        one takes `net`'s patch embedding and position table from here on (diffusers' pipeline copies them in)."""
        if not isinstance(net, MMDiT):
            raise ValueError(f"an SD3 ControlNet (SD3ControlNetModel) needs an SD3 model; this model's network is "
                             f"{type(net).__name__}")
        keys = ("width", "patch_size", "in_channels", "pooled_dim") + (("context_dim",) if self.stream == "joint"
                                                                        else ())
        if any(getattr(self.cfg, k) != getattr(net.cfg, k) for k in keys):
            raise ValueError("this SD3 ControlNet was made for another transformer: " + ", ".join(
                f"{k} {getattr(self.cfg, k)} vs the model's {getattr(net.cfg, k)}" for k in keys))
        if self.stream == "image":
            self._base = (net,)                  # a tuple: not a submodule of ours (no second copy, state or .to())

    def hint_latents(self, image: torch.Tensor, autoencoder) -> torch.Tensor:
        """Control image (B, 3, H, W) in [0, 1] -> scaled latents (posterior mode); InstantX's (zero_pooled) were
        trained without the autoencoder's shift: z * scale, not (z - shift) * scale. An inpainting ControlNet's
        (B, 4, H, W), RGB + the repaint mask: [latents of the image blacked out where the mask is, 1 - mask]."""
        if image.shape[1] != 3 + self.mask_channels:
            raise ValueError(f"this SD3 ControlNet reads {3 + self.mask_channels} channels (RGB" +
                             (" + the repaint mask: an inpainting ControlNet, for ldm.inpaint" if self.mask_channels
                              else "") + f"), got {image.shape[1]}")
        rgb, mask = image[:, :3], image[:, 3:]
        if self.mask_channels:
            rgb = torch.where(mask > 0.5, 0.0, rgb)                        # black: -1 once in [-1, 1]
        z = autoencoder.encode_latents(rgb * 2 - 1, sample=False)
        if self.zero_pooled and not self.mask_channels:
            z = z + (autoencoder.config.shift_factor or 0.0) * autoencoder.config.scaling_factor
        if self.mask_channels:
            z = torch.cat([z, 1 - F.interpolate(mask.to(z.dtype), size=z.shape[-2:])], dim=1)   # nearest
        return z

    def forward(self, x, t, context, hint, pooled, context_mask=None):
        if self.zero_pooled:
            pooled = torch.zeros_like(pooled)
        dtype, p = self.hint_embed.weight.dtype, self.cfg.patch_size
        B, _, H, W = x.shape
        hint = self.hint_embed(hint.to(dtype)).flatten(2).transpose(1, 2)       # (B, N, D)
        if self.stream == "image":
            return self._image(x, t, hint, pooled)
        body = self.body
        body._check_inputs(x, context, context_mask, pooled, None, None)
        c = body._conditioning(t, pooled, None, B, dtype)
        h = body.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2) + body.positions(H // p, W // p).to(dtype)
        h = h + hint
        ctx = body.context_embed(context.to(dtype))
        mask = None
        if context_mask is not None:
            mask = torch.cat([context_mask.new_ones(B, h.shape[1]), context_mask], dim=1).bool()
        out = []
        for block, zero in zip(body.blocks, self.zero):
            h, ctx = body._run(block, h, ctx, c, mask)
            out.append(zero(h))
        return out

    def _image(self, x, t, hint, pooled):
        """SD 3.5 Large's: x's tokens by the base's patch embedding and positions, then the image-only blocks."""
        if not self._base:
            raise ValueError("an SD 3.5 Large ControlNet takes its base's patch embedding: check_base(the MMDiT) first "
                             "(attach_controlnets does)")
        base, p, dtype = self._base[0], self.cfg.patch_size, hint.dtype
        H, W = x.shape[-2:]
        h = base.patch_embed(x.to(base.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        h = (h + base.positions(H // p, W // p)).to(dtype) + hint
        c = self.body.conditioning(t, pooled, x.shape[0], dtype)
        out = []
        for block, zero in zip(self.body.blocks, self.zero):
            h = block(h, c)
            out.append(zero(h))
        return out

    @staticmethod
    def attach(net, controls: list, autoencoder, active=None) -> "ControlledMMDiT":
        """`net` (the SD3 teacher, maybe wrapped) with controls [(SD3ControlNet, image in [0, 1], scale), ...]
        attached, their images encoded once here; `active`: as ControlledUNet's."""
        bound = []
        ae = next(autoencoder.parameters())
        for control, image, scale, *mode in controls:
            if mode:
                raise ValueError("SD3 ControlNets take no control mode (that is FLUX.1's Union ControlNets')")
            with torch.no_grad():
                bound.append((control, control.hint_latents(image.to(ae.device, ae.dtype), autoencoder), float(scale)))
        return ControlledMMDiT(net, bound, active)


def inpaint_control(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An inpainting ControlNet's control "image": RGB (B, 3, H, W) in [0, 1] and the repaint mask (1 or B, 1, H, W),
    1 = repaint, side by side (B, 4, H, W)."""
    return torch.cat([image, mask.to(image).expand(image.shape[0], -1, -1, -1)], dim=1)


class ControlledMMDiT(ControlledTransformer):
    """An MMDiT with SD3 ControlNets attached: forward like the MMDiT's; each (controlnet, latents (1 or B, C, h, w),
    scale) adds scale x its residuals (several: summed, as diffusers' SD3MultiControlNetModel) at the t where
    `active` (ldm.models.controlnet.ControlSteps, or None: all t) says it acts."""

    def forward(self, x, t, context, context_mask=None, cond_emb=None, pooled=None, **added):
        residuals, dtype = [], next(self.net.parameters()).dtype    # a ControlNet in fp32 on a bf16 net adds bf16
        for net, (hint, scale), on in zip(self.nets, self.controls, acting(self.active, t, len(self.nets))):
            if not on:
                continue
            hint = hint.to(x.device).repeat(x.shape[0] // hint.shape[0], 1, 1, 1)    # CFG's halves share it
            r = [(s * scale).to(dtype) for s in net(x, t, context, hint, pooled, context_mask)]
            if residuals and len(r) != len(residuals):
                raise ValueError("several SD3 ControlNets must have as many blocks each to add up")
            residuals = [a + b for a, b in zip(residuals, r)] if residuals else r
        return self.net(x, t, context, context_mask, cond_emb, control=residuals or None, pooled=pooled, **added)


def load_sd3_controlnet(path: str, d: dict, state: dict) -> SD3ControlNet:
    """An SD3ControlNetModel from its config.json dict `d` and diffusers-named weights `state`."""
    from ldm.models.weights import load_state_dict_strict, split_renamed
    mask_channels = d.get("extra_conditioning_channels", 0) or 0
    if mask_channels not in (0, 1):
        raise ValueError(f"{path}: extra_conditioning_channels {mask_channels}: only inpainting ControlNets' 1 (the "
                         "mask) is supported")
    own_patches, text = d.get("use_pos_embed", True), d.get("joint_attention_dim", 4096) is not None
    if own_patches != text:
        raise ValueError(f"{path}: use_pos_embed {own_patches} with joint_attention_dim "
                         f"{d.get('joint_attention_dim')}: supported are InstantX's layout (use_pos_embed true, a "
                         "joint_attention_dim) and SD 3.5 Large's (use_pos_embed false, joint_attention_dim null)")
    if own_patches and d.get("pos_embed_type", "sincos") != "sincos":
        raise ValueError(f"{path}: pos_embed_type {d['pos_embed_type']!r}: only SD3's sincos table is supported")
    keys = {k: v for k, v in d.items() if k not in _OURS_ONLY}
    if not text:   # no text stream, no patch embedding: the MMDiT config's text and table fields are moot
        width = keys.get("num_attention_heads", 18) * keys.get("attention_head_dim", 64)
        keys.update(joint_attention_dim=0, caption_projection_dim=width, pos_embed_max_size=1, qk_norm=None,
                    dual_attention_layers=())
    cfg = mmdit_config_from_diffusers(keys)
    cfg = dataclasses.replace(cfg, out_channels=cfg.in_channels)   # no output layer: out_channels is moot
    net = SD3ControlNet(cfg, d.get("force_zeros_for_pooled_projection", True), "joint" if text else "image",
                        mask_channels)
    # its own layers by _KEYS; the copy of the base transformer's blocks in that transformer's names
    load_state_dict_strict(net, split_renamed(state, _KEYS, diffusers_to_ours, "body."), path)
    return net


# ---- Stability's single files of SD 3.5 Large's ControlNets -----------------------------------------------------

# Their block names -> diffusers' (diffusers' scripts/convert_sd3_controlnet_to_diffusers.py): a fused attn.qkv is
# three projections (its thirds of rows); the embeddings, pos_embed_input and controlnet_blocks keep their names.
ORIGINAL_BLOCK = {"attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.proj": ("attn.to_out.0",),
                  "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",), "adaLN_modulation.1": ("norm1.linear",)}
_ORIGINAL_KEY = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)")
ORIGINAL_MARKS = ("transformer_blocks.0.attn.qkv.weight", "pos_embed_input.proj.weight",
                  "time_text_embed.text_embedder.linear_1.weight")


def original_to_diffusers(state: dict) -> dict:
    """An SD 3.5 Large ControlNet's original keys -> diffusers' SD3ControlNetModel keys."""
    out = {}
    for key, value in state.items():
        m = _ORIGINAL_KEY.fullmatch(key)
        if m and m[2] in ORIGINAL_BLOCK:
            names = ORIGINAL_BLOCK[m[2]]
            out.update({f"transformer_blocks.{m[1]}.{name}.{m[3]}": part
                        for name, part in zip(names, value.chunk(len(names)))})
        else:
            out[key] = value
    return out


def config_from_original(state: dict, source: str) -> dict:
    """The SD3ControlNetModel config.json dict of an SD 3.5 Large ControlNet, read off its original tensors."""
    missing = [k for k in ORIGINAL_MARKS if k not in state]
    if missing:
        raise ValueError(f"{source}: not an SD 3.5 Large ControlNet in Stability's layout (no {', '.join(missing)}); "
                         "other ControlNets are read as diffusers folders (config.json + weights)")
    width, channels, patch, _ = state["pos_embed_input.proj.weight"].shape        # (D, C, p, p)
    if width % SD3_HEAD_DIM:
        raise ValueError(f"{source}: width {width} is no multiple of SD3's {SD3_HEAD_DIM}-channel heads")
    depth = len({k.split(".")[1] for k in state if k.startswith("controlnet_blocks.")})
    return {"_class_name": CLASS_NAME, "patch_size": patch, "in_channels": channels, "out_channels": channels,
            "num_layers": depth, "attention_head_dim": SD3_HEAD_DIM, "num_attention_heads": width // SD3_HEAD_DIM,
            "joint_attention_dim": None, "caption_projection_dim": width,
            "pooled_projection_dim": state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            "pos_embed_max_size": None, "pos_embed_type": None, "use_pos_embed": False,
            "force_zeros_for_pooled_projection": False}


def load_original_sd3_controlnet(path: str) -> SD3ControlNet:
    """An SD 3.5 Large ControlNet from Stability's single .safetensors file."""
    from ldm.models.weights import read_weights
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: a single-file ControlNet is read as Stability's SD 3.5 Large .safetensors; other "
                         "ControlNets as diffusers folders (config.json + weights)")
    state = read_weights(path)
    return load_sd3_controlnet(path, config_from_original(state, path), original_to_diffusers(state))
