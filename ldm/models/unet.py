"""The text-conditioned U-Net of Stable Diffusion (Rombach et al. 2022, LDM Sec. 3.3).

Encoder levels of ResBlocks (+ spatial transformers attending to the text tokens),
a middle block, decoder levels mirroring the encoder with skip connections.
Timesteps enter through a sinusoidal embedding and an MLP; an optional extra
vector (`cond_emb`, e.g. the guidance-weight embedding of the distilled student,
Meng et al. 2023) is added to that embedding.

Time scaling: the embedding is sinusoidal in whatever scalar is passed; its
frequencies are made for discrete steps t in [0, 1000). A caller with continuous
t in [0, 1] should pass 1000 * t.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ldm.models.deepcache import DeepCache
from ldm.models.layers import (
    Downsample, GroupNorm, ResBlock, SpatialTransformer, TimestepMLP, Upsample, timestep_embedding,
)
from ldm.models.weights import CONFIG_NAME, load_state_dict_strict  # noqa: F401  (re-exported)
from ldm.models.weights import Pretrained, strict_from_dict

ADDED_CONDS = (None, "text_time")


@dataclass
class UNetConfig:
    in_channels: int = 4                              # latent channels in
    out_channels: int = 4                             # prediction channels (eps / v / x0)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per level (diffusers: block_out_channels)
    layers_per_block: int = 2                         # ResBlocks per encoder level (decoder: one more)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with transformers (CompVis: resolutions 2**level)
    num_heads: int | tuple[int, ...] | None = 8  # heads per transformer (int or per level) ...
    head_dim: int | None = None                       # ... or fixed head width (SD 2.x: 64); set exactly one
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per spatial transformer (int or per level)
    context_dim: int = 768                            # text token width D_ctx
    linear_projection: bool = False                   # Linear proj_in/out (SD 2.x) instead of 1x1 conv (SD 1.x)
    mid_attention: bool = True                        # spatial transformer in the middle block
    norm_groups: int = 32                             # GroupNorm groups everywhere
    norm_eps: float = 1e-5                            # GroupNorm eps of ResBlocks and the output norm
    dropout: float = 0.0                              # ResBlock and feed-forward dropout
    gradient_checkpointing: bool = False              # recompute blocks in backward: less memory, ~30% more time
    pos_embed: bool = False                           # 2-D position features added to transformer tokens (not SD)
    added_cond: str | None = None                     # "text_time": SDXL's pooled text + size numbers (UNet._added)
    added_in_dim: int = 2816                          # text_time: MLP input, pooled width + numbers x their sinusoid
    added_id_dim: int = 256                           # text_time: sinusoid width of each number

    @property
    def downsample_factor(self) -> int:
        """Latent sides must divide by this: every level but the last halves them."""
        return 2 ** (len(self.channels) - 1)

    def __post_init__(self):
        self.channels = tuple(self.channels)
        self.attention_levels = tuple(self.attention_levels)
        for name in ("num_heads", "transformer_depth"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"UNetConfig: set exactly one of num_heads ({self.num_heads}) "
                             f"and head_dim ({self.head_dim})")
        if self.added_cond not in ADDED_CONDS:
            raise ValueError(f"UNetConfig.added_cond must be one of {ADDED_CONDS}, got {self.added_cond!r}")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < len(self.channels)]
        if bad:
            raise ValueError(f"UNetConfig.attention_levels: levels {bad} outside 0..{len(self.channels) - 1}")
        for name in ("num_heads", "transformer_depth"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != len(self.channels):
                raise ValueError(f"UNetConfig.{name}: {len(value)} entries for {len(self.channels)} levels")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    def per_level(self, name: str, level: int):
        value = getattr(self, name)
        return value[level] if isinstance(value, tuple) else value

    def heads(self, level: int) -> tuple[int, int]:
        """(heads, head_dim) of the transformers at `level`."""
        ch = self.channels[level]
        if self.head_dim is not None:
            heads, head_dim = ch // self.head_dim, self.head_dim
        else:
            heads = self.per_level("num_heads", level)
            head_dim = ch // heads
        if heads * head_dim != ch:
            raise ValueError(f"UNetConfig: level {level} width {ch} not divisible into heads "
                             f"(num_heads={self.num_heads}, head_dim={self.head_dim})")
        return heads, head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return strict_from_dict(cls, d)


class _Level(nn.Module):
    """One resolution: ResBlocks, optional transformers after each, optional resampler."""

    def __init__(self, res, attn, resample, resample_name):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    @property
    def resample(self):
        return getattr(self, self.resample_name, None)


class _Mid(nn.Module):
    """ResBlock, transformer (optional), ResBlock at the lowest resolution."""

    def __init__(self, res1, attn, res2):
        super().__init__()
        self.res1, self.attn, self.res2 = res1, attn, res2


def freeu(h: torch.Tensor, skip: torch.Tensor, b: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU (Si et al. 2024), training-free, in the two deepest decoder levels: the backbone's first half of
    channels times b (its denoising, "structure" part), and the skip's lowest frequencies times s (the
    2 x 2 centre of its shifted 2-D spectrum), so the decoder leans less on the encoder's high-frequency
    detail. The released code's form (a constant b, not the paper's mean-feature modulation)."""
    half = h.shape[1] // 2
    h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
    spectrum = torch.fft.fftshift(torch.fft.fftn(skip.float(), dim=(-2, -1)), dim=(-2, -1))
    H, W = skip.shape[-2:]
    scale = torch.ones(H, W, device=skip.device)
    scale[H // 2 - 1: H // 2 + 1, W // 2 - 1: W // 2 + 1] = s
    skip = torch.fft.ifftn(torch.fft.ifftshift(spectrum * scale, dim=(-2, -1)), dim=(-2, -1)).real.to(skip.dtype)
    return h, skip


class UNet(Pretrained, nn.Module):
    """eps/v-prediction U-Net: forward(x (B,C,H,W), t (B,), context (B,L,D)) -> (B,C_out,H,W)."""

    config_class = UNetConfig

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, emb_dim, n = cfg.channels, cfg.time_embed_dim, cfg.layers_per_block

        def res(c_in, c_out):
            return ResBlock(c_in, c_out, emb_dim, cfg.norm_groups, cfg.norm_eps, cfg.dropout)

        def attn(level, c):
            heads, head_dim = cfg.heads(level)
            return SpatialTransformer(c, heads, head_dim, cfg.context_dim, cfg.per_level("transformer_depth", level),
                                      cfg.norm_groups, cfg.linear_projection, cfg.dropout, cfg.pos_embed)

        self.time_embed = TimestepMLP(ch[0], emb_dim)
        if cfg.added_cond == "text_time":   # SDXL (Podell et al. 2023, sec. 2.2): pooled text + size/crop numbers
            self.add_embed = TimestepMLP(cfg.added_in_dim, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        # Encoder; remember every skip's width for the decoder.
        skips, c, down = [ch[0]], ch[0], []
        for lvl, c_out in enumerate(ch):
            blocks = []
            for _ in range(n):
                blocks.append(res(c, c_out))
                c = c_out
                skips.append(c)
            last = lvl == len(ch) - 1
            if not last:
                skips.append(c)
            down.append(_Level(blocks, [attn(lvl, c) for _ in range(n)] if lvl in cfg.attention_levels else [],
                               None if last else Downsample(c), "downsample"))
        self.down = nn.ModuleList(down)
        self.skip_channels = tuple(skips)   # widths of the skips, in order (a ControlNet adds one residual to each)
        self.freeu: tuple[float, float, float, float] | None = None   # (b1, b2, s1, s2): see `freeu`
        self.deepcache: DeepCache | None = None    # reuse deep decoder features across calls (ldm.models.deepcache)

        self.mid = _Mid(res(c, c), attn(len(ch) - 1, c) if cfg.mid_attention else None, res(c, c))

        # Decoder, built deepest first; up[lvl] mirrors down[lvl] and takes n + 1 skips.
        up = [None] * len(ch)
        for lvl in reversed(range(len(ch))):
            blocks = []
            for _ in range(n + 1):
                blocks.append(res(c + skips.pop(), ch[lvl]))
                c = ch[lvl]
            up[lvl] = _Level(blocks, [attn(lvl, c) for _ in range(n + 1)] if lvl in cfg.attention_levels else [],
                             Upsample(c) if lvl > 0 else None, "upsample")
        self.up = nn.ModuleList(up)

        self.norm_out = GroupNorm(ch[0], cfg.norm_groups, cfg.norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.cfg.gradient_checkpointing = enabled

    def _run(self, block, *args):
        if self.cfg.gradient_checkpointing and torch.is_grad_enabled():  # a frozen (eval) U-Net too: a ControlNet's
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _embed(self, x, t, cond_emb, pooled=None, time_ids=None):
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        t = t.to(x.device).reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.to(x.device).reshape(-1)
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"UNet: t has {t.shape[0]} entries for a batch of {x.shape[0]}")
        emb = self.time_embed(timestep_embedding(t, self.cfg.channels[0]).to(self.conv_in.weight.dtype))
        if cond_emb is not None:
            if cond_emb.shape != emb.shape:
                raise ValueError(f"UNet: cond_emb shape {tuple(cond_emb.shape)}, expected {tuple(emb.shape)}")
            emb = emb + cond_emb.to(emb.dtype)
        if self.cfg.added_cond is not None:
            emb = emb + self._added(pooled, time_ids, x.shape[0]).to(emb.dtype)
        elif pooled is not None or time_ids is not None:
            raise ValueError("UNet: pooled / time_ids given, but this U-Net has no added conditioning")
        return emb  # (B, time_embed_dim)

    def _added(self, pooled, time_ids, batch: int) -> torch.Tensor:
        """SDXL's micro-conditioning: the pooled text embedding (B, P) beside the sinusoids of the numbers
        (B, K) (original height, width, crop top, left, target height, width), through an MLP; the sinusoid
        is the timesteps' own ([cos, sin], base 10^4), so its frequencies suit pixel counts in the 1000s."""
        cfg = self.cfg
        if pooled is None or time_ids is None:
            raise ValueError("UNet: this U-Net (added_cond='text_time', SDXL) needs `pooled` (B, P) and "
                             "`time_ids` (B, K) beside the context")
        if (pooled.ndim, time_ids.ndim) != (2, 2) or pooled.shape[0] != batch or time_ids.shape[0] != batch or \
                pooled.shape[1] + time_ids.shape[1] * cfg.added_id_dim != cfg.added_in_dim:
            raise ValueError(f"UNet: pooled {tuple(pooled.shape)} and time_ids {tuple(time_ids.shape)} do not make "
                             f"the {cfg.added_in_dim} inputs of its added embedding ({cfg.added_id_dim} per number) "
                             f"for a batch of {batch}")
        ids = timestep_embedding(time_ids.reshape(-1), cfg.added_id_dim).reshape(batch, -1)
        dtype = self.add_embed.fc1.weight.dtype
        return self.add_embed(torch.cat([pooled.to(dtype), ids.to(dtype)], dim=1))

    def _check_inputs(self, x, context) -> None:
        if context.shape[-1] != self.cfg.context_dim:
            raise ValueError(f"UNet: context width {context.shape[-1]}, config context_dim {self.cfg.context_dim}")
        factor = self.cfg.downsample_factor
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"UNet: spatial size {tuple(x.shape[-2:])} must be divisible by {factor}")

    def encode(self, h, emb, context, context_mask=None, adapter=None, stop: int | None = None):
        """The encoder and the middle block from conv_in's output h: (h, skips). A ControlNet runs this too.
        adapter: T2I-Adapter features (Mou et al. 2023, eq. 4), one added per level where diffusers adds its
        down_intrablock_additional_residuals, a last one on the middle block's output (ldm.models.t2i_adapter).
        stop: return (None, the first `stop` skips) once they are final: DeepCache's shallow path D_1..D_m."""
        features = list(adapter) if adapter is not None else None
        skips = [h]

        def shallow_done(level):   # the first `stop` skips are final; a level adding a plain adapter feature is not
            return stop is not None and len(skips) >= stop and not (features and not len(level.attn))

        for level in self.down:
            for i, block in enumerate(level.res):
                if shallow_done(level):
                    return None, skips[:stop]
                h = self._run(block, h, emb)
                if len(level.attn):
                    h = self._run(level.attn[i], h, context, context_mask)
                    if features and i == len(level.res) - 1:      # after the level's last transformer
                        h = add_feature(h, features.pop(0))
                skips.append(h)
            if level.resample is not None and not shallow_done(level):
                h = level.resample(h)
                skips.append(h)
            if features and not len(level.attn):                  # a plain level: its output and last skip
                h = skips[-1] = add_feature(h, features.pop(0))
            if stop is not None and len(skips) >= stop:
                return None, skips[:stop]
        h = self._run(self.mid.res1, h, emb)
        if self.mid.attn is not None:
            h = self._run(self.mid.attn, h, context, context_mask)
        h = self._run(self.mid.res2, h, emb)
        if features:                                              # SDXL's adapters: one more, at the middle
            h = add_feature(h, features.pop(0))
            if features:
                raise ValueError(f"UNet: {len(adapter)} T2I-Adapter features for {len(self.down)} levels and "
                                 "the middle block")
        return h, skips

    def forward(self, x, t, context, context_mask=None, cond_emb=None, control=None, pooled=None, time_ids=None,
                adapter=None):
        """x (B,C,H,W), t (B,) or scalar in [0, 1000), context (B,L,D), context_mask (B,L) bool True=attend.
        control: (residuals, one per skip, mid residual) from ControlNets (ldm.models.controlnet), added
        to the skips and to the middle block's output (Zhang et al. 2023, eq. 2 and Fig. 3).
        pooled (B, P), time_ids (B, K): SDXL's added conditioning (`added_cond="text_time"` only).
        adapter: T2I-Adapter features [(B, C_k, h_k, w_k)] added inside the encoder (`encode`)."""
        self._check_inputs(x, context)
        emb = self._embed(x, t, cond_emb, pooled, time_ids)
        context = context.to(self.conv_in.weight.dtype)
        cache = self.deepcache
        if cache is not None:
            cache.check(len(self.skip_channels))
        reuse = cache is not None and cache.reuse(x)   # DeepCache: only the shallow path, around the cached feature
        h, skips = self.encode(self.conv_in(x.to(self.conv_in.weight.dtype)), emb, context, context_mask, adapter,
                               stop=cache.branch + 1 if reuse else None)
        if control is not None:
            down, mid = control
            down = down[:len(skips)] if reuse else down   # the shallow path's skips only
            skips = [s + r.to(s.dtype) for s, r in zip(skips, down, strict=True)]
            h = h if reuse else h + mid.to(h.dtype)

        index = len(self.skip_channels)                # the skip the next decoder block takes; conv_in's is 0
        for depth, level in enumerate(reversed(self.up)):
            for i, block in enumerate(level.res):
                index -= 1
                if reuse and index > cache.branch:     # a deep block: F_cache stands for its output
                    continue
                if reuse and index == cache.branch:    # DeepCache (Ma et al. 2024): U_m(Concat(D_m(x_t), F_cache))
                    h = cache.feature
                elif cache is not None and index == cache.branch:   # a full call: F_cache = U_{m+1}(.)
                    cache.store(x, h)
                skip = skips.pop()
                if self.freeu is not None and depth < 2:
                    h, skip = freeu(h, skip, self.freeu[depth], self.freeu[2 + depth])
                h = self._run(block, torch.cat([h, skip], dim=1), emb)
                if len(level.attn):
                    h = self._run(level.attn[i], h, context, context_mask)
            if level.resample is not None and not (reuse and index > cache.branch):
                h = level.resample(h)
        return self.conv_out(self.norm_out(h))


def add_feature(h: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """h + a T2I-Adapter feature of h's shape; ValueError naming both shapes else (an adapter for another model)."""
    if feature.shape[1:] != h.shape[1:]:
        raise ValueError(f"UNet: a T2I-Adapter feature {tuple(feature.shape[1:])} where the U-Net has "
                         f"{tuple(h.shape[1:])} (an adapter for another base model, or another image size?)")
    return h + feature.to(h.dtype)


def sdxl_time_ids(size_ids: torch.Tensor | None, latent_shape: tuple[int, ...], factor: int) -> torch.Tensor:
    """SDXL's six numbers a sample is drawn or trained with (Podell et al. 2023, sec. 2.2), (B, 6), for latents
    of `latent_shape` (B, C, h, w) from an autoencoder of downsampling `factor`: the picture's original
    height, width and crop corner (`size_ids` (B, 4), as the loaders record them,
    ldm.data.transforms.preprocess), then the size drawn at; None: an uncropped picture of that size, as
    diffusers' pipeline draws by default (and as the shapes world, or a latent cache built before the
    numbers were kept, counts)."""
    batch, height, width = latent_shape[0], latent_shape[-2] * factor, latent_shape[-1] * factor
    if size_ids is None:
        size_ids = torch.tensor([[height, width, 0, 0]], dtype=torch.float32).expand(batch, 4)
    target = torch.tensor([[height, width]], dtype=torch.float32, device=size_ids.device).expand(batch, 2)
    return torch.cat([size_ids.float(), target], dim=1)


def refuse_refiner(index, what: str) -> None:
    """ValueError for SDXL's refiner (a model_index with aesthetic scores): the training stages feed
    base-style numbers (size, crop, target size), not its (size, crop, aesthetic score)."""
    if index.aesthetic is not None:
        raise ValueError(f"{what} does not take SDXL's refiner (aesthetic-score numbers): use it to sample "
                         "(img2img) or start from the base model")


# ---- perturbed-attention guidance: self-attention layers by name -----------------------------

PAG_LAYERS = ("mid",)   # the default, as diffusers' pag_applied_layers


def transformers_by_name(unet: UNet) -> dict[str, SpatialTransformer]:
    """Every spatial transformer by name, in the order they run: "down.L.I", "mid.0", "up.L.I", I its place in its
    level. Levels are counted as diffusers counts down_blocks and up_blocks: the encoder's from the full resolution,
    the decoder's in the order the decoder runs, deepest first (so SD 1.x's "up.1" is up_blocks.1)."""
    names = {}
    for lvl, level in enumerate(unet.down):
        names.update({f"down.{lvl}.{i}": t for i, t in enumerate(level.attn)})
    if unet.mid.attn is not None:
        names["mid.0"] = unet.mid.attn
    for lvl, level in enumerate(reversed(unet.up)):
        names.update({f"up.{lvl}.{i}": t for i, t in enumerate(level.attn)})
    return names


def layer_names(unet: UNet) -> list[str]:
    """The names `self_attention_layers` takes: each transformer's and each prefix of one ("down", "down.1", ...)."""
    parts = (name.split(".") for name in transformers_by_name(unet))
    return list(dict.fromkeys(".".join(p[:k]) for p in parts for k in range(1, len(p) + 1)))


def self_attention_layers(unet: UNet, names) -> list[nn.Module]:
    """The self-attentions (every transformer block's attn1; cross-attention is never picked) of the transformers
    that `names` pick: a transformer's name or a prefix of it (`layer_names`): "mid", "down.1", "up.0.2", ...
    diffusers' spellings of the same read alike: "mid_block", "down_blocks.1", "up_blocks.0.attentions.2".
    ValueError for a name that picks none, listing those that do."""
    found, valid = transformers_by_name(unet), layer_names(unet)
    picked = {}
    for name in names:
        key = name.strip().replace("down_blocks", "down").replace("up_blocks", "up").replace("mid_block", "mid")
        key = key.replace(".attentions.", ".")
        if key not in valid:
            raise ValueError(f"no self-attention layer {name!r} in this U-Net; its layers: {', '.join(valid)} "
                             "(down.L / up.L count levels as diffusers' down_blocks / up_blocks)")
        picked.update((full, t) for full, t in found.items() if full == key or full.startswith(key + "."))
    return [block.attn1 for t in picked.values() for block in t.blocks]


@contextmanager
def perturbed_self_attention(layers: list[nn.Module], samples: torch.Tensor):
    """Within it, `layers` (from `self_attention_layers`) take the identity as their attention map for the samples
    where `samples` (B,) bool is True (layers.Attention.perturbed), so one U-Net call over a batch gives plain and
    perturbed predictions side by side (perturbed-attention guidance, Ahn et al. 2024). For sampling: a
    gradient-checkpointed backward recomputes after the switch is off."""
    for attn in layers:
        attn.identity = samples
    try:
        yield
    finally:
        for attn in layers:
            attn.identity = None


# ---- self-attention guidance: the middle block's attention map -------------------------------

def sag_attention(unet: UNet) -> tuple[nn.Module, nn.Module]:
    """(transformer, self-attention) whose map self-attention guidance reads: the middle block's first transformer
    block's attn1, as diffusers' StableDiffusionSAGPipeline (mid_block.attentions[0].transformer_blocks[0].attn1)
    and the A1111 SAG extension (middle_block.1 ... attn1) read it. ValueError for a U-Net without one."""
    if not isinstance(unet, UNet):
        raise ValueError(f"--sag (self-attention guidance) reads a U-Net's middle-block self-attention; this model's "
                         f"network is {type(unet).__name__}")
    if unet.mid.attn is None:
        raise ValueError("--sag (self-attention guidance) reads the middle block's self-attention map; this U-Net "
                         "has no transformer in its middle block (mid_attention: false)")
    return unet.mid.attn, unet.mid.attn.blocks[0].attn1


def attention_received(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N): the attention each token of x (B, N, C) receives in the self-attention `attn`, its map
    softmax(Q K^T / sqrt(d)) (queries in rows) summed over the queries and averaged over the heads, in float32.
    Rows sum to 1, so the tokens average 1: above 1, a token more attended to than the average (the mask of Hong
    et al. 2023). Recomputed from Q and K: the attention kernels never form the map. A head at a time: SDXL's
    middle block at 2048 px has 4096 tokens, a (B, N, N) map of 64 MiB a sample."""
    q, k = (attn._split(lin(x)).float() for lin in (attn.to_q, attn.to_k))          # (B, H, N, d)
    received = q.new_zeros(q.shape[0], q.shape[2])
    for h in range(q.shape[1]):
        weights = torch.softmax(q[:, h] @ k[:, h].transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)   # (B, N_q, N_k)
        received += weights.sum(1)
    return received / q.shape[1]


@contextmanager
def recorded_attention(unet: UNet):
    """Within it, each U-Net call appends to the yielded list the middle block's map (`sag_attention`) as
    `attention_received` gives it, shaped (B, h, w) like the block's feature. For one sampling call at a time."""
    transformer, attn = sag_attention(unet)
    maps, sizes = [], []
    hooks = [transformer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[-2:])),
             attn.register_forward_pre_hook(
                 lambda module, args: maps.append(attention_received(module, args[0]).unflatten(1, sizes[-1])))]
    try:
        yield maps
    finally:
        for hook in hooks:
            hook.remove()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- presets -----------------------------------------------------------------------------

def tiny_config(**overrides) -> UNetConfig:
    """A ~1M-parameter U-Net for unit tests (8x8 latents)."""
    base = dict(in_channels=4, out_channels=4, channels=(32, 64), layers_per_block=1, attention_levels=(1,),
                num_heads=2, context_dim=32, norm_groups=8)
    return UNetConfig(**{**base, **overrides})


def shapes64_config(**overrides) -> UNetConfig:
    """The shapes-world default: 4x16x16 latents of 64x64 images (AE f=4), 3.83M parameters.

    Sized for the 60 MB fp16 budget of the shipped model (teacher + 4 students + AE + text
    encoder): attention at 8x8 and 4x4 (+ mid), text width 128.
    """
    base = dict(in_channels=4, out_channels=4, channels=(48, 96, 96), layers_per_block=1,
                attention_levels=(1, 2), num_heads=None, head_dim=32, context_dim=128, norm_groups=16)
    return UNetConfig(**{**base, **overrides})


def sd15_config(**overrides) -> UNetConfig:
    """Stable Diffusion 1.x sizes: 859.5M parameters."""
    base = dict(channels=(320, 640, 1280, 1280), layers_per_block=2, attention_levels=(0, 1, 2),
                num_heads=8, context_dim=768, linear_projection=False)
    return UNetConfig(**{**base, **overrides})


def sd2_config(**overrides) -> UNetConfig:
    """Stable Diffusion 2.x sizes: head width 64, OpenCLIP-H context 1024, linear projections."""
    base = dict(channels=(320, 640, 1280, 1280), layers_per_block=2, attention_levels=(0, 1, 2),
                num_heads=None, head_dim=64, context_dim=1024, linear_projection=True)
    return UNetConfig(**{**base, **overrides})


def sdxl_config(**overrides) -> UNetConfig:
    """SDXL base sizes (Podell et al. 2023, Tab. 1): three levels, no attention at the first, 2 and 10
    transformer blocks at the others and the middle, head width 64, context 2048 (CLIP ViT-L's 768 beside
    OpenCLIP bigG's 1280 tokens), pooled bigG text (1280) + 6 size numbers x 256 added to the time embedding."""
    base = dict(channels=(320, 640, 1280), layers_per_block=2, attention_levels=(1, 2), num_heads=None, head_dim=64,
                transformer_depth=(1, 2, 10), context_dim=2048, linear_projection=True, added_cond="text_time",
                added_in_dim=1280 + 6 * 256, added_id_dim=256)
    return UNetConfig(**{**base, **overrides})


PRESETS = {"tiny": tiny_config, "shapes64": shapes64_config, "sd15": sd15_config, "sd2": sd2_config, "sdxl": sdxl_config}
