"""IP-Adapter (Ye et al. 2023): an image as a prompt, through decoupled cross-attention.

    python -m ldm.txt2img "a cat, best quality" --model models/sd15 --teacher \
        --ip-adapter ip-adapter_sd15.safetensors --image-encoder models/image_encoder --ip-image style.png

A CLIP image encoder's embedding of the image is projected to a few tokens (`ImageTokens`: a linear map
and a LayerNorm, their sec. 3.2.1); every cross-attention of the U-Net gets its own key and value
projections for them and adds their attention to the text's, scaled (their eq. 5):
    Z = Attention(Q, K, V) + scale * Attention(Q, K', V'),   K' = c_i W'_k, V' = c_i W'_v.
Files as shared for SD 1.x/2.x: `image_proj.proj|norm.*` and `ip_adapter.<i>.to_k_ip|to_v_ip.weight`,
with i the position of the cross-attention among all attention layers in diffusers' order (down
blocks, up blocks, mid block; self-attention even, cross-attention odd), in one .safetensors or a
.bin holding the two dicts. The "plus" and "full face" variants (a resampler) are refused by name.
The unconditional half of CFG gets the tokens of an all-zero embedding, as in diffusers' pipeline.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm import ops


class ImageTokens(nn.Module):
    """CLIP image embedding (B, E) -> (B, n, D) tokens: Linear(E, n D), reshape, LayerNorm(D)."""

    def __init__(self, embed_dim: int, tokens: int, dim: int):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.proj = nn.Linear(embed_dim, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, embeds):
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, self.dim))


class _Tokens:
    """What the wrapped cross-attentions read during one U-Net call (set by `IPAdapterUNet`)."""
    tokens: torch.Tensor | None = None
    scale: float = 1.0


class IPCrossAttention(nn.Module):
    """A U-Net cross-attention (ldm.models.layers.Attention) with the image tokens' keys and values added."""

    def __init__(self, attn: nn.Module, context_dim: int, state: _Tokens):
        super().__init__()
        inner = attn.to_q.out_features
        self.attn, self.state = attn, state
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)

    def forward(self, x, context=None, mask=None):
        a = self.attn
        q, out = a.attend(x, context, mask)
        tokens = self.state.tokens
        if tokens is not None:  # decoupled cross-attention: the image tokens' own keys and values
            tokens = tokens.to(x.dtype)
            ip = ops.attention(q, a._split(self.to_k_ip(tokens)), a._split(self.to_v_ip(tokens)))
            out = out + self.state.scale * ip
        return a.merge(out)


def cross_attentions(unet) -> list[tuple[nn.Module, str]]:
    """(transformer block, "attn2") of every cross-attention, in diffusers' order: down, up (deepest first), mid."""
    transformers = [t for level in unet.down for t in level.attn]
    transformers += [t for level in reversed(unet.up) for t in level.attn]
    transformers += [unet.mid.attn] if unet.mid.attn is not None else []
    return [(block, "attn2") for t in transformers for block in t.blocks]


# XLabs' FLUX.1 files (ldm.models.ip_adapter_flux) -> diffusers' names, as diffusers' FluxIPAdapterMixin reads them
_PARTS = {"image_proj": "image_proj", "ip_adapter_proj_model": "image_proj", "ip_adapter": "ip_adapter",
          "double_blocks": "ip_adapter"}
_XLABS_NAMES = {"processor.": "", "ip_adapter_double_stream_k_proj": "to_k_ip",
                "ip_adapter_double_stream_v_proj": "to_v_ip"}


def read_ip_adapter(path: str) -> tuple[dict, dict]:
    """(image_proj state, ip_adapter state) from a .safetensors (prefixed keys; XLabs' FLUX.1 names renamed to
    diffusers') or .bin (two dicts)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            flat = load_file(path)
            state = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                part, _, rest = key.partition(".")
                if part in _PARTS:
                    for theirs, ours in _XLABS_NAMES.items():
                        rest = rest.replace(theirs, ours)
                    state[_PARTS[part]][rest] = value
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable IP-Adapter file ({type(err).__name__}: {err})") from None
    proj, attn = state.get("image_proj") or {}, state.get("ip_adapter") or {}
    if "latents" in proj or any(k.startswith("proj_in") for k in proj):
        raise ValueError(f"{path}: an IP-Adapter Plus / Face (resampler projection); only the base IP-Adapter is supported")
    if not {"proj.weight", "proj.bias", "norm.weight", "norm.bias"} <= set(proj) or not attn:
        raise ValueError(f"{path}: no IP-Adapter weights (image_proj.proj/norm and ip_adapter.<i>.to_k_ip) in it")
    return proj, attn


def for_flux(attn_state: dict) -> bool:
    """Whether an ip_adapter state is FLUX.1's (XLabs): its image keys and values have biases, a U-Net's none."""
    return any(key.endswith("_ip.bias") for key in attn_state)


class IPAdapterUNet(nn.Module):
    """A U-Net or FLUX.1 (or a wrapper of one) whose forward also takes `ip_tokens` (B, n, D) for its IP-Adapter
    layers (wrapped cross-attentions; ldm.models.ip_adapter_flux's image attention); None runs it as it was."""

    def __init__(self, unet: nn.Module, state: _Tokens):
        super().__init__()
        self.unet, self.cfg, self.state = unet, unet.cfg, state

    def forward(self, x, t, context, context_mask=None, cond_emb=None, ip_tokens=None, **added):
        self.state.tokens = ip_tokens
        try:
            return self.unet(x, t, context, context_mask, cond_emb, **added)
        finally:
            self.state.tokens = None


def attach_ip_adapter(unet, path: str, scale: float = 1.0) -> tuple[ImageTokens, _Tokens]:
    """Wrap `unet`'s cross-attentions with the file's image key/value projections (in place); returns the
    token projection and the shared state an `IPAdapterUNet` fills. ValueError before any change if the
    file does not fit."""
    proj_state, attn_state = read_ip_adapter(path)
    if for_flux(attn_state):
        raise ValueError(f"{path}: an IP-Adapter for FLUX.1 (XLabs' flux-ip-adapter: image keys and values with "
                         "biases per double block); this model's network is a U-Net")
    places = cross_attentions(unet)
    dim = unet.cfg.context_dim
    expected = {f"{2 * i + 1}.{name}.weight" for i in range(len(places)) for name in ("to_k_ip", "to_v_ip")}
    if set(attn_state) != expected:
        raise ValueError(f"{path}: {len(attn_state) // 2} cross-attention entries, this U-Net has {len(places)} "
                         "(an IP-Adapter for another model?)")
    tokens, width = proj_state["proj.weight"].shape[0] // dim, proj_state["norm.weight"].shape[0]
    if width != dim or tokens * dim != proj_state["proj.weight"].shape[0]:
        raise ValueError(f"{path}: image tokens {width} wide, this U-Net's text is {dim}")
    image_tokens = ImageTokens(proj_state["proj.weight"].shape[1], tokens, dim)
    image_tokens.load_state_dict(proj_state)
    state = _Tokens()
    state.scale = float(scale)
    wrapped = []
    for i, (block, name) in enumerate(places):
        layer = IPCrossAttention(getattr(block, name), dim, state)
        layer.to_k_ip.weight.data.copy_(attn_state[f"{2 * i + 1}.to_k_ip.weight"])
        layer.to_v_ip.weight.data.copy_(attn_state[f"{2 * i + 1}.to_v_ip.weight"])
        wrapped.append((block, name, layer))
    for block, name, layer in wrapped:                  # every check passed: now change the U-Net
        param = next(block.parameters())
        setattr(block, name, layer.to(device=param.device, dtype=param.dtype))
    param = next(unet.parameters())
    return image_tokens.to(device=param.device, dtype=param.dtype).eval(), state


class ImageEncoder:
    """A transformers CLIPVisionModelWithProjection folder (IP-Adapter repos ship it as image_encoder/) with its
    CLIPImageProcessor (the folder's preprocessor_config.json, else CLIP's 224 px defaults)."""

    def __init__(self, folder: str, device="cpu"):
        import os
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
        self.model = CLIPVisionModelWithProjection.from_pretrained(folder).to(device).eval()
        has_processor = os.path.isfile(os.path.join(folder, "preprocessor_config.json"))
        self.processor = CLIPImageProcessor.from_pretrained(folder) if has_processor else CLIPImageProcessor()

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        """PIL images (or a list) -> (B, E) image embeddings."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        return self.model(pixels.to(self.model.device, self.model.dtype)).image_embeds
