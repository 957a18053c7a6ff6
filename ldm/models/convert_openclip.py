"""An OpenCLIP text tower (open_clip's CLIP state dict, as SD 2.x checkpoint files hold it under
`cond_stage_model.model.`) -> the weights and config of a transformers CLIPTextModel.

SD 2.x conditions its U-Net on the penultimate layer of OpenCLIP ViT-H/14's text tower, after the
final LayerNorm (Stability AI's v2 configs: `FrozenOpenCLIPEmbedder`, `layer: penultimate`). Dropping
the last layer makes that the model's `last_hidden_state`, which is how diffusers' SD 2.x pipelines
ship the encoder too; so a file and the diffusers folder of the same model give the same folder here,
and `--clip-skip` counts from the layer SD 2.x was trained on.

open_clip's layers fuse q, k and v into one `in_proj` (3D, D), in that order (torch's
nn.MultiheadAttention); transformers keeps three (D, D) projections. Its tokenizer pads with id 0
("!" in the CLIP vocabulary), not with the end token as SD 1.x's CLIP tokenizer does: the U-Net sees
all 77 token states, padding included, so the padding id is part of the model.
"""
from __future__ import annotations

import re

import torch

PAD_TOKEN = "!"                 # id 0: open_clip.tokenize's padding
HEAD_WIDTH = 64                 # every OpenCLIP text tower (ViT-B 512/8, L 768/12, H 1024/16, bigG 1280/20)
IGNORED = ("text_projection", "logit_scale", "attn_mask")   # the contrastive head and a rebuilt buffer
REQUIRED = ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight")
_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}


def text_tower(state: dict, prefix: str) -> dict:
    """The text tower's entries of a checkpoint, prefix removed (a vision tower, if any, left out)."""
    tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in tower.items() if not k.startswith("visual.")}


def num_layers(tower: dict) -> int:
    found = {int(m[1]) for k in tower if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if not found:
        raise ValueError("no transformer.resblocks.* weights: not an OpenCLIP text tower")
    return max(found) + 1


def clip_config(tower: dict, drop_last: bool = True) -> dict:
    """transformers' CLIPTextConfig of the tower, read off its weight shapes."""
    missing = [k for k in REQUIRED if k not in tower]
    if missing:
        raise ValueError(f"OpenCLIP text tower: the weights lack {missing}")
    vocab, width = tower["token_embedding.weight"].shape
    projection = tower.get("text_projection")
    return {"vocab_size": vocab, "hidden_size": width, "num_attention_heads": width // HEAD_WIDTH,
            "intermediate_size": tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": num_layers(tower) - int(drop_last),
            "max_position_embeddings": tower["positional_embedding"].shape[0],
            "projection_dim": projection.shape[1] if projection is not None else width,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407}


def to_transformers(tower: dict, drop_last: bool = True, projection: bool = False) -> dict:
    """The tower's weights under CLIPTextModel's names (with `projection`, CLIPTextModelWithProjection's:
    SDXL's pooled vector is bigG's projected end token); unknown entries are refused by name."""
    keep = num_layers(tower) - int(drop_last)
    out, unknown = {}, []
    if projection:   # open_clip multiplies x @ P (D, P'); transformers' Linear holds P^T
        if "text_projection" not in tower:
            raise ValueError("OpenCLIP text tower: no text_projection to make the pooled vector from")
        out["text_projection.weight"] = tower["text_projection"].t()
    for key, value in tower.items():
        if key in IGNORED:
            continue
        if key in _TOP:
            out["text_model." + _TOP[key]] = value
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj(?=_)|.+(?=\.))[._](weight|bias)", key)
        if m is None:
            unknown.append(key)
            continue
        layer, name, kind = int(m[1]), m[2], m[3]
        if name != "attn.in_proj" and name not in _LAYER:
            unknown.append(key)
        elif layer < keep:                    # the dropped last layer's weights are left out
            base = f"text_model.encoder.layers.{layer}."
            if name == "attn.in_proj":        # rows: q, then k, then v
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{part}_proj.{kind}"] = chunk
            else:
                out[f"{base}{_LAYER[name]}.{kind}"] = value
    if unknown:
        raise ValueError(f"OpenCLIP text tower: unexpected weights {unknown[:5]}"
                         f"{' and more' if len(unknown) > 5 else ''}")
    return {k: v.float().contiguous() if torch.is_floating_point(v) else v for k, v in out.items()}
