"""IP-Adapter for FLUX.1 (XLabs-AI/flux-ip-adapter): an image as a prompt for FLUX.1's double-stream blocks.

    python -m ldm.txt2img "a cat wearing sunglasses" --model models/flux-dev \
        --ip-adapter ip_adapter.safetensors --image-encoder models/clip-vit-large-patch14 --ip-image style.png

As for the U-Nets (ldm.models.ip_adapter, Ye et al. 2023), a CLIP ViT-L/14 image embedding is projected to a few
tokens as wide as T5's (`ImageTokens`: Linear(768, 4 x 4096), LayerNorm). Each double block i then lets the image
tokens' queries (after their RMSNorm, before RoPE) attend to keys and values of its own (Linears with biases) on
those tokens, and adds the result, scaled, to the block's image output, after its MLP, with no output projection
and no gate (XLabs' IPDoubleStreamBlockProcessor, diffusers' FluxIPAdapterAttnProcessor):
    x <- DoubleBlock(x) + scale * Attention(q_x, c_i W'_k + b'_k, c_i W'_v + b'_v).
The single-stream blocks and the text stream are untouched.
Files: XLabs' `ip_adapter_proj_model.proj|norm.*` and `double_blocks.<i>.processor.ip_adapter_double_stream_k_proj|
v_proj.weight|bias`, or the same under diffusers' names (`image_proj.*`, `ip_adapter.<i>.to_k_ip|to_v_ip.*`);
ldm.models.ip_adapter.read_ip_adapter reads both. CFG's unconditional half (FLUX.1-schnell with w > 0) gets the
tokens of a black image, as diffusers' FluxPipeline's true CFG does by default (`negative_image`).
"""
from __future__ import annotations

from torch import nn

from ldm import ops
from ldm.models.ip_adapter import ImageTokens, _Tokens, for_flux, read_ip_adapter
from ldm.models.mmdit import merge_heads


class IPImageAttention(nn.Module):
    """One double block's attention of image queries on the image prompt's tokens (read from the shared state)."""

    def __init__(self, token_dim: int, width: int, heads: int, state: _Tokens):
        super().__init__()
        self.heads, self.state = heads, state
        self.to_k_ip = nn.Linear(token_dim, width)
        self.to_v_ip = nn.Linear(token_dim, width)

    def _heads(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)       # (B, n, D) -> (B, H, n, d)

    def forward(self, q):
        """q (B, H, N, d) image queries -> scale * their attention on the tokens (B, N, D); 0 without tokens."""
        tokens = self.state.tokens
        if tokens is None:
            return 0
        tokens = tokens.to(q.dtype)
        out = ops.attention(q, self._heads(self.to_k_ip(tokens)), self._heads(self.to_v_ip(tokens)))
        return self.state.scale * merge_heads(out)


def attach_flux_ip_adapter(flux, path: str, scale: float = 1.0) -> tuple[ImageTokens, _Tokens]:
    """Give every double block of `flux` (ldm.models.flux.Flux) the file's image attention (in place); returns the
    token projection and the shared state an `IPAdapterUNet` fills. ValueError before any change if the file does
    not fit."""
    proj_state, attn_state = read_ip_adapter(path)
    if not for_flux(attn_state):
        raise ValueError(f"{path}: an IP-Adapter for a U-Net (SD 1.x/2.x, SDXL: image keys and values without biases "
                         "per cross-attention); this model's network is FLUX.1's transformer")
    cfg, blocks = flux.cfg, flux.double_blocks
    names = ("to_k_ip.weight", "to_k_ip.bias", "to_v_ip.weight", "to_v_ip.bias")
    if set(attn_state) != {f"{i}.{name}" for i in range(len(blocks)) for name in names}:
        found = len({key.split(".")[0] for key in attn_state})
        raise ValueError(f"{path}: image attention for {found} double blocks, this FLUX.1 has {len(blocks)} "
                         "(an IP-Adapter for another model?)")
    dim, rows = cfg.context_dim, proj_state["proj.weight"].shape[0]
    if proj_state["norm.weight"].shape[0] != dim or rows % dim:
        raise ValueError(f"{path}: image tokens {proj_state['norm.weight'].shape[0]} wide, this FLUX.1's text tokens "
                         f"are {dim} (an IP-Adapter for another model?)")
    for key, value in attn_state.items():
        if value.shape != ((cfg.width, dim) if key.endswith("weight") else (cfg.width,)):
            raise ValueError(f"{path}: {key} is {tuple(value.shape)}, this FLUX.1 takes ({cfg.width}, {dim}) "
                             f"weights and ({cfg.width},) biases")
    image_tokens = ImageTokens(proj_state["proj.weight"].shape[1], rows // dim, dim)
    image_tokens.load_state_dict(proj_state)
    state = _Tokens()
    state.scale = float(scale)
    layers = []
    for i in range(len(blocks)):
        layer = IPImageAttention(dim, cfg.width, cfg.num_heads, state)
        layer.load_state_dict({name: attn_state[f"{i}.{name}"] for name in names})
        layers.append(layer)
    param = next(flux.parameters())
    for block, layer in zip(blocks, layers):               # every check passed: now change the net
        block.ip = layer.to(device=param.device, dtype=param.dtype)
    return image_tokens.to(device=param.device, dtype=param.dtype).eval(), state


def negative_image(image):
    """The unconditional image prompt for `image` (PIL): a black image of its size (diffusers' FluxPipeline's
    negative_ip_adapter_image default)."""
    from PIL import Image
    return Image.new("RGB", image.size)
