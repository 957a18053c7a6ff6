"""LyCORIS's LoHa and LoKr updates, as LoRA files for SD 1.x/2.x and SDXL carry them: kohya's module keys
(`lora_unet_<module>`, `lora_te_`, `lora_te1_`, `lora_te2_`, ldm.models.lora's naming) ending in these factors.

    LoHa   dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r,  r = hada_w1_b's rows:
           the Hadamard product of two rank-r matrices reaches rank r^2 (FedPara, Hyeon-Woo et al. 2022).
           Conv kernels: w1_b / w2_b flattened (r, in*kh*kw), or Tucker cores hada_t1 / hada_t2 (r, r, kh, kw)
           with w*_a (r, out), w*_b (r, in): each factor is the core times w*_a and w*_b on its first two modes.
    LoKr   dW = W1 kron W2 * alpha / r (Yeh et al. 2024, "Navigating text-to-image customization: from LyCORIS
           fine-tuning to model evaluation"), W1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, W2 = lokr_w2 or
           lokr_w2_a @ lokr_w2_b or the Tucker core lokr_t2 with lokr_w2_a (r, b), lokr_w2_b (r, d);
           r = the rank of the factored W2, else of the factored W1; both full: scale 1, the file's alpha unused.
           Conv kernels: W2 a kernel (b, d, kh, kw) (W1's entries scale whole kernels), or W2 flattened
           (b, d*kh*kw), whose kron is the same numbers as the kernel's once reshaped.
    No `.alpha` key: scale 1 (kohya's LoRA likewise defaults alpha to r).
These scale rules are LyCORIS's own (lycoris/modules/loha.py, lokr.py) and ComfyUI's and A1111's loaders'.
peft's LoKr scales by alpha / r even with both factors full; LyCORIS files never carry that case with
alpha != r (LyCORIS writes alpha = r there), so the two agree on the files people share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KEYS = LOHA_KEYS + LOKR_KEYS


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """core (r1, r2, kh, kw) with a (r1, out) on mode 1 and b (r2, in) on mode 2 -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)


def loha_product(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """(w1a w1b) * (w2a w2b) elementwise, each side rebuilt from its Tucker core where the file has one."""
    sides = [tucker(f[f"hada_t{i}"], f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]) if f"hada_t{i}" in f
             else f[f"hada_w{i}_a"] @ f[f"hada_w{i}_b"] for i in (1, 2)]
    return sides[0] * sides[1]


def lokr_product(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """kron(W1, W2), W1 / W2 full or rebuilt from their low-rank (or Tucker) factors."""
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"]) \
        if "lokr_t2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]                      # (a, c, 1, 1): each W1 entry scales a whole W2 kernel
    return torch.kron(w1, w2.contiguous())              # kron views its inputs: an einsum's result may not be


def missing_factors(kind: str, names) -> list[str]:
    """The factors a LoHa / LoKr module lacks, given the ones it has (empty: complete)."""
    have = set(names)
    if kind == "LoHa":
        need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if have & {"hada_t1", "hada_t2"}:
            need += ["hada_t1", "hada_t2"]               # Tucker: both sides or neither
        return [n for n in need if n not in have]
    out = [] if "lokr_w1" in have else [n for n in ("lokr_w1_a", "lokr_w1_b") if n not in have]
    return out + ([] if "lokr_w2" in have else [n for n in ("lokr_w2_a", "lokr_w2_b") if n not in have])


def rank(kind: str, f: dict[str, torch.Tensor]) -> int | None:
    """The r of alpha / r: LoHa's w1_b rows; LoKr's factored W2's, else factored W1's; None if both full."""
    if kind == "LoHa":
        return f["hada_w1_b"].shape[0]
    b = f.get("lokr_w2_b", f.get("lokr_w1_b"))
    return None if b is None else b.shape[0]


@dataclass
class Factored:
    """One module's LoHa or LoKr update: weight += scale * dW(factors), reshaped to the weight's shape."""
    kind: str                          # "LoHa" or "LoKr"
    factors: dict[str, torch.Tensor]   # the file's key ends (hada_w1_a, lokr_w2, ...) -> tensors
    scale: float                       # alpha / r (1 without alpha, or LoKr with both factors full)
    key: str = ""                      # the file's module key (lora_unet_...), for messages

    def _named(self) -> str:
        return ", ".join(f"{self.key}.{k} {tuple(v.shape)}" for k, v in self.factors.items())

    def delta(self, shape: torch.Size) -> torch.Tensor:
        f = {k: v.float() for k, v in self.factors.items()}
        try:
            dw = loha_product(f) if self.kind == "LoHa" else lokr_product(f)
        except RuntimeError as err:                    # inner sizes that do not multiply
            raise ValueError(f"{self.kind} factors {self._named()} do not combine ({err})") from None
        if dw.shape[0] != shape[0] or dw[0].numel() != math.prod(shape[1:]):
            raise ValueError(f"{self.kind} factors {self._named()} make a {tuple(dw.shape)} update, which does "
                             f"not fit a weight of shape {tuple(shape)}")
        return dw.reshape(shape) * self.scale


def factored(factors: dict[str, torch.Tensor], alpha: float | None, key: str) -> Factored:
    """A module's LoHa or LoKr factors (key end -> tensor) and its `.alpha` (None if absent) -> its update."""
    kinds = {"LoHa" if k in LOHA_KEYS else "LoKr" for k in factors}
    if len(kinds) > 1:
        raise ValueError(f"{key} has both LoHa (hada_) and LoKr (lokr_) factors")
    kind = kinds.pop()
    lacking = missing_factors(kind, factors)
    if lacking:
        raise ValueError(f"{kind} module {key} has no {', '.join(lacking)}")
    r = rank(kind, factors)
    return Factored(kind, dict(factors), 1.0 if alpha is None or r is None else alpha / r, key)
