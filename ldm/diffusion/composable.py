"""Composable diffusion (Liu et al. 2022): classifier-free guidance towards several prompts at once, a model wrapper.

Their conjunction (AND) with classifier-free guidance, in our convention (sd scale s = 1 + w, `guidance.cfg`):

    D(x | c_1 AND ... AND c_K) = D(u) + sum_i W_i (1 + w) (D(c_i) - D(u)),

summing each sub-prompt's guidance direction from the unconditional (negative) prediction D(u), as the A1111 web
UI's denoiser does with its weights W_i (default 1; a negative W_i is their negation, NOT). K = 1 with W = 1 is plain
CFG. The sum is linear in the predictions with weights 1 - s sum_i W_i and s W_i that sum to 1, so, as for `cfg`,
guiding x0-hat equals guiding eps-hat or v-hat at the same x_t and wrapping a `Denoiser` is exact.
"""
from __future__ import annotations

import torch

from .guidance import is_per_sample
from .param import append_dims


def composable_cfg(model, w, uncond: dict, owner, weights):
    """Model function (x, t, **extra_args) -> for each sample b of x (B, ...):

        D(u) + sum_{i: owner[i] = b} weights[i] (1 + w) (D(c_i) - D(u)),

    computed as (1 + w) sum_i W_i D(c_i) - (w + (1 + w) (sum_i W_i - 1)) D(u), the same sum that rounds exactly as
    `cfg`'s (1 + w) D(c) - w D(u) when a sample has one sub-prompt of weight 1.

    owner (N,): the sample each of the N sub-prompts belongs to (sorted or not; every sample needs one); weights
    (N,): their W_i. extra_args' per-sample values hold one row per sub-prompt (context (N, L, D), its mask, SDXL's
    pooled vector and size numbers, ...); `uncond` maps the text keys to the unconditional (negative) prompt's values,
    1 or B rows, and its other per-sample values take the row of the sample's first sub-prompt. One model call of
    N + B samples: [x[owner]; x], rows [c_1 .. c_N; u_1 .. u_B]. w: float or per-sample (B,) tensor."""
    owner = torch.as_tensor(owner, dtype=torch.long)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if owner.ndim != 1 or weights.shape != owner.shape:
        raise ValueError(f"owner {tuple(owner.shape)} and weights {tuple(weights.shape)}: need one of each per "
                         "sub-prompt, (N,)")
    batch = int(owner.max()) + 1 if len(owner) else 0
    if set(owner.tolist()) != set(range(batch)):
        raise ValueError(f"owner {owner.tolist()}: every sample 0..{batch - 1} needs a sub-prompt")
    first = torch.stack([(owner == b).nonzero()[0, 0] for b in range(batch)])     # (B,) a row of each sample
    total = torch.zeros(batch, dtype=torch.float64).index_add_(0, owner, weights)  # (B,) sum_i W_i

    def guided(x, t, **extra_args):
        if x.shape[0] != batch:
            raise ValueError(f"x has {x.shape[0]} samples, the composition {batch}")
        n, dev = len(owner), x.device
        rows, t = owner.to(dev), torch.as_tensor(t, device=dev)
        args = {}
        for key, value in extra_args.items():
            if key in uncond:
                u = torch.as_tensor(uncond[key]).to(device=value.device, dtype=value.dtype)
                args[key] = torch.cat([value, u.expand(batch, *u.shape[1:]) if u.shape[0] == 1 else u])
            elif is_per_sample(value, n):
                args[key] = torch.cat([value, value.index_select(0, first.to(value.device))])
            else:
                args[key] = value                           # scalars and options pass through
        out = model(torch.cat([x.index_select(0, rows), x]), t if t.ndim == 0 else torch.cat([t[rows], t]), **args)
        pred_cond, pred_uncond = out[:n], out[n:]                                   # (N, ...), (B, ...)
        wi = append_dims(weights.to(device=dev, dtype=out.dtype), out.ndim)
        mixed = torch.zeros_like(pred_uncond).index_add_(0, rows, wi * pred_cond)   # sum_i W_i D(c_i)
        wt = append_dims(torch.as_tensor(w, dtype=out.dtype, device=dev), out.ndim)
        excess = append_dims((total - 1).to(device=dev, dtype=out.dtype), out.ndim)  # sum_i W_i - 1, 0 for CFG
        return (1 + wt) * mixed - (wt + (1 + wt) * excess) * pred_uncond
    return guided


# Options the composition does not take, as the CLI names them: each batches or splits the rows its own way
# (ControlNets, adapters and image inputs repeat per CFG half, rescale / APG / intervals / PAG act on one pair).
REFUSED = {"guidance_rescale": "--guidance-rescale", "control": "--controlnet", "adapter": "--t2i-adapter",
           "inpaint": "an inpainting U-Net's image inputs", "ip": "--ip-adapter", "reference": "an image input",
           "true_cfg": "--true-cfg", "guidance_interval": "--guidance-interval", "pag": "--pag", "apg": "--apg",
           "sag": "--sag", "image_guidance": "--image-guidance", "window": "--window"}


def check_composition(pipe, steps: int, teacher: bool, **options) -> None:
    """ValueError where composable prompts cannot run on `pipe` (a TextToImage): a student for `steps` (it was
    distilled to match several teacher steps of plain CFG in one, and its outputs for several prompts do not sum to
    the composition's), a model without plain CFG, or one of `options` (keys of REFUSED) set."""
    if pipe.uses_student(steps, teacher):
        raise ValueError(f"composable prompts ('a AND b', ':WEIGHT') need the teacher (--teacher; teacher=True in "
                         f"Python): student-{steps} folds CFG of one prompt into its single pass, and its outputs "
                         "for several prompts do not combine into the composition (or pick --steps without a student)")
    if pipe.index.guidance_embed or pipe.index.image_input == "instruct-pix2pix":
        raise ValueError("composable prompts ('a AND b', ':WEIGHT') need a model with plain CFG; this one's guidance "
                         "is " + ("an input of its net (FLUX.1-dev)" if pipe.index.guidance_embed else
                                  "InstructPix2Pix's over the image and the instruction"))
    for key, value in options.items():
        if value:
            raise ValueError(f"{REFUSED[key]} does not combine with composable prompts ('a AND b', ':WEIGHT'): "
                             "draw it with one prompt")


def composed_model(pipe, steps: int, teacher: bool, guidance: float, negative: str, chunks: int | None,
                   shape: tuple[int, ...] | None, owner: list[int], weights: list[float]):
    """(x0-model, extra_args maker, info) for TextToImage.model_function: the teacher's U-Net under
    `composable_cfg`, `negative` its unconditional rows; K + 1 net evaluations a call, K the most sub-prompts of a
    prompt in the batch (fewer ride in the same call)."""
    check_composition(pipe, steps, teacher)
    uncond = pipe.unconditional(negative, chunks, shape)
    model = composable_cfg(pipe.denoiser(pipe.image_input_net(None, None), pipe.index.prediction), guidance, uncond,
                           owner, weights)
    most = max(owner.count(b) for b in set(owner))
    return model, lambda cond: cond, {"model": "teacher", "nfe_per_step": most + 1}
