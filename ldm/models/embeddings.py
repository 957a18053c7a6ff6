"""Textual-inversion embeddings (Gal et al. 2023): new words for a CLIP (or our scratch) text encoder, as people
share them.

    python -m ldm.txt2img "a <cat-toy> on a beach" --embedding cat-toy.safetensors:<cat-toy> --model models/sd15
    python -m ldm.txt2img "a castle" --teacher --negative "EasyNegative" --embedding EasyNegative.safetensors ...

An embedding file holds k vectors of the text encoder's token-embedding width (768 for SD 1.x,
1024 for SD 2.x). Its word enters the tokenizer as k new tokens, `word word_1 ... word_{k-1}`, and a
prompt that says `word` gets all k (diffusers' convention, so the same files give the same images).
Layouts read:
    A1111 .pt            {"string_to_param": {"*": (k, D)}, "name": ...}
    A1111 .safetensors   {"emb_params": (k, D)}
    diffusers            {word: (k, D) or (D,)} (.safetensors or .bin), or a bare tensor
The word is the one given (`FILE:WORD`), else the one a .safetensors file's metadata names (`word`: the
files stages/train_embedding.py writes), else the file's name without its suffix (what the A1111 web UI
uses). SDXL files hold a word for each of its two encoders, {"clip_l": (k, 768), "clip_g": (k, 1280)}
(`read_embedding_pair`). Our scratch text encoder (the shapes model) takes words too: its k vectors are
(k, width) rows appended to its token table (ScratchTextEncoder.add_embedding). .pt/.bin files are read with `torch.load(weights_only=True)`: no code in a
shared file runs.
"""
from __future__ import annotations

from pathlib import Path

import torch


def parse_embedding_arg(arg: str) -> tuple[str, str | None]:
    """'FILE' or 'FILE:WORD' -> (FILE, WORD or None); a Windows drive letter is not a word."""
    path, sep, word = arg.rpartition(":")
    if not sep or not path or "/" in word or "\\" in word or len(path) == 1:
        return arg, None
    return path, word


def _load(path: str):
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # a truncated file, a pickle with code in it, not a tensor file at all
        raise ValueError(f"{path}: not a readable embedding file ({type(err).__name__}: {err})") from None


def _vectors(path: str, vectors) -> torch.Tensor:
    if not torch.is_tensor(vectors) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        raise ValueError(f"{path}: the embedding is not a (k, D) float tensor")
    return vectors.reshape(-1, vectors.shape[-1]).float()


def read_embedding_pair(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An SDXL embedding's (clip_l (k, 768), clip_g (k, 1280)) vectors, float32; ValueError otherwise."""
    state = _load(path)
    if not isinstance(state, dict) or not {"clip_l", "clip_g"} <= set(state):
        keys = list(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not an SDXL embedding (keys {keys}; expected clip_l and clip_g): an SDXL "
                         "model needs a word for each of its two encoders")
    return _vectors(path, state["clip_l"]), _vectors(path, state["clip_g"])


def read_embedding(path: str) -> tuple[str | None, torch.Tensor]:
    """(the word the file names or None, vectors (k, D) float32) from any layout above; ValueError otherwise."""
    state = _load(path)
    name = None
    if torch.is_tensor(state):
        vectors = state
    elif isinstance(state, dict) and "string_to_param" in state:
        vectors, name = state["string_to_param"]["*"], state.get("name")
    elif isinstance(state, dict) and {"clip_l", "clip_g"} <= set(state):
        raise ValueError(f"{path}: an SDXL embedding (clip_l + clip_g), for an SDXL model's two encoders")
    elif isinstance(state, dict) and "emb_params" in state:
        vectors = state["emb_params"]
    elif isinstance(state, dict) and len(state) == 1:
        name, vectors = next(iter(state.items()))
    else:
        keys = list(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: no embedding layout recognised (keys {keys}; expected string_to_param, "
                         "emb_params or a single word)")
    return (str(name) if name is not None else None), _vectors(path, vectors)


def stored_word(path: str) -> str | None:
    """The word a .safetensors file's metadata names (`{"word": ...}`, as stages/train_embedding.py writes it)."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("word") or None
    except Exception:          # unreadable: `read_embedding` says why
        return None


def embedding_word(path: str, word: str | None) -> str:
    """The word a prompt uses: the one given, else the one the file's metadata names (our trained files), else
    the file name's stem (the A1111 web UI's choice; diffusers takes the word stored in the file, which
    `read_embedding` returns)."""
    return word or stored_word(path) or Path(path).stem


def word_tokens(word: str, k: int) -> list[str]:
    """The k tokens of a k-vector word: word, word_1, ..., word_{k-1} (diffusers' names)."""
    return [word] + [f"{word}_{i}" for i in range(1, k)]
