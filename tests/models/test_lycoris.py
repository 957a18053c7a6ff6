"""LyCORIS's LoHa and LoKr in LoRA files (ldm.models.lycoris, read by ldm.models.lora): the merged weight is what
peft's own LoHa / LoKr merge gives for the same factors, and the closed forms by hand; on a tiny SD pipeline a
LoHa, a LoKr and a mixed file draw what diffusers draws with dW added to its weights by hand (test-side formulas)."""
import copy
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from sd_layouts import PROMPTS, diffusers_images, write_sd_pipeline

from ldm.models.from_diffusers import convert
from ldm.models.lora import merge_lora, read_lora
from ldm.models.lycoris import Factored
from ldm.pipeline import TextToImage

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")


# ----------------------------------------------------------------------------- one layer: peft as the reference

def _peft_merge(toy: nn.Module, config) -> tuple[nn.Module, dict]:
    """(toy with peft's adapter merged in, its factors under LyCORIS's kohya keys `lora_te_<name>.<factor>`)."""
    wrapped = peft.get_peft_model(copy.deepcopy(toy), config)
    factors = {}
    for name, p in wrapped.named_parameters():
        m = re.fullmatch(r"base_model\.model\.(\w+)\.((?:hada|lokr)_\w+)\.default", name)
        if m:
            with torch.no_grad():
                p.normal_(0, 0.3)                      # peft's own random init leaves Tucker products ~1e-5
            factors[f"lora_te_{m[1]}.{m[2]}"] = p.detach().clone().contiguous()
    return wrapped.merge_and_unload(), factors


def _our_merge(toy, factors, alpha, tmp_path, scale):
    state = dict(factors) | {f"lora_te_{n}.alpha": torch.tensor(float(alpha)) for n, _ in toy.named_children()}
    save_file(state, str(tmp_path / "lyco.safetensors"))
    ours = copy.deepcopy(toy)
    assert merge_lora(read_lora(str(tmp_path / "lyco.safetensors")), [], {"text_encoder": ours}, scale) == len(toy)
    return ours


def _toy(out=96, inp=64, conv_out=48, conv_in=32):
    torch.manual_seed(0)
    return nn.ModuleDict({"fc": nn.Linear(inp, out), "conv": nn.Conv2d(conv_in, conv_out, 3, padding=1)})


# label -> (peft config, which factors the file has (their shapes come from peft's own layout choices))
PEFT_CASES = {
    "loha flattened conv": (lambda: peft.LoHaConfig(r=3, alpha=5, target_modules=["fc", "conv"], init_weights=False),
                            {"fc.hada_w1_a", "conv.hada_w2_b"}),
    "loha tucker conv": (lambda: peft.LoHaConfig(r=3, alpha=5, target_modules=["fc", "conv"], init_weights=False,
                                                 use_effective_conv2d=True), {"conv.hada_t1", "conv.hada_t2"}),
    "lokr w1 full, w2 low-rank": (lambda: peft.LoKrConfig(r=2, alpha=5, target_modules=["fc", "conv"],
                                                          init_weights=False), {"fc.lokr_w1", "fc.lokr_w2_a"}),
    "lokr both low-rank": (lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["fc", "conv"], init_weights=False,
                                                   decompose_both=True), {"fc.lokr_w1_a", "conv.lokr_w2_b"}),
    "lokr tucker conv": (lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["fc", "conv"], init_weights=False,
                                                 use_effective_conv2d=True), {"conv.lokr_t2"}),
    # both factors full: LyCORIS writes alpha = r there, and then peft's alpha / r and our 1 agree
    "lokr both full, 4-D w2": (lambda: peft.LoKrConfig(r=8, alpha=8, target_modules=["fc", "conv"],
                                                       init_weights=False), {"fc.lokr_w2", "conv.lokr_w1"}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_merge_equals_peft_merge(tmp_path, case):
    make_config, expect = PEFT_CASES[case]
    config, toy, scale = make_config(), _toy(), 0.7
    theirs, factors = _peft_merge(toy, config)
    assert expect <= {k.removeprefix("lora_te_") for k in factors}, sorted(factors)   # the layout meant
    ours = _our_merge(toy, factors, config.alpha, tmp_path, scale)
    for name in ("fc", "conv"):
        w0, w1 = toy[name].weight, theirs[name].weight
        assert (w1 - w0).abs().max() > 1e-3, name                                     # peft changed it
        torch.testing.assert_close(ours[name].weight, w0 + scale * (w1 - w0), atol=1e-5, rtol=1e-5)


def test_lokr_4d_factor_is_peft_conv_kernel(tmp_path):
    """A 3x3 conv's LoKr with W2 a full kernel (b, d, 3, 3): peft's merge and ours of one file."""
    make_config, _ = PEFT_CASES["lokr both full, 4-D w2"]
    theirs, factors = _peft_merge(_toy(), make_config())
    assert factors["lora_te_conv.lokr_w2"].dim() == 4
    ours = _our_merge(_toy(), factors, 8, tmp_path, 1.0)
    torch.testing.assert_close(ours["conv"].weight, theirs["conv"].weight, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- closed forms by hand

def test_closed_forms():
    w1, w2 = torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([[0., 1.], [1., 0.]])
    # [[1 W2, 2 W2], [3 W2, 4 W2]]
    kron = torch.tensor([[0., 1., 0., 2.], [1., 0., 2., 0.], [0., 3., 0., 4.], [3., 0., 4., 0.]])
    full = Factored("LoKr", {"lokr_w1": w1, "lokr_w2": w2}, 1.0)
    torch.testing.assert_close(full.delta(torch.Size((4, 4))), kron, atol=0, rtol=0)
    # W2 = a b of rank 1 ([[0], [1]] [[1, 0]] = [[0, 0], [1, 0]]), alpha 3 over rank 1: scale 3
    from ldm.models.lycoris import factored
    low = factored({"lokr_w1": w1, "lokr_w2_a": torch.tensor([[0.], [1.]]), "lokr_w2_b": torch.tensor([[1., 0.]])},
                   3.0, "k")
    hand = torch.tensor([[0., 0., 0., 0.], [1., 0., 2., 0.], [0., 0., 0., 0.], [3., 0., 4., 0.]]) * 3
    torch.testing.assert_close(low.delta(torch.Size((4, 4))), hand, atol=0, rtol=0)
    assert factored({"lokr_w1": w1, "lokr_w2": w2}, 5.0, "k").scale == 1.0             # both full: no alpha
    assert factored({"lokr_w1": w1, "lokr_w2_a": torch.ones(2, 1), "lokr_w2_b": torch.ones(1, 2)}, None, "k").scale == 1
    # LoHa: (w1a w1b) * (w2a w2b) = [[3, 4], [6, 8]] * [[1, 1], [2, 2]] (elementwise), alpha 4 over rank 1
    loha = factored({"hada_w1_a": torch.tensor([[1.], [2.]]), "hada_w1_b": torch.tensor([[3., 4.]]),
                     "hada_w2_a": torch.tensor([[1.], [2.]]), "hada_w2_b": torch.tensor([[1., 1.]])}, 4.0, "k")
    torch.testing.assert_close(loha.delta(torch.Size((2, 2))), torch.tensor([[3., 4.], [12., 16.]]) * 4, atol=0, rtol=0)
    # rank 2 on each side reaches rank 4 = 2 * 2 (FedPara): more than a rank-2 LoRA could
    g = torch.Generator().manual_seed(0)
    hada = {k: torch.randn(*s, generator=g) for k, s in (("hada_w1_a", (6, 2)), ("hada_w1_b", (2, 6)),
                                                        ("hada_w2_a", (6, 2)), ("hada_w2_b", (2, 6)))}
    assert torch.linalg.matrix_rank(factored(hada, 2.0, "k").delta(torch.Size((6, 6)))) == 4


def test_tucker_is_the_core_contracted_with_both_factors():
    """hada_t1 with a 1x1 kernel: a^T core b, the plain matrix product."""
    g = torch.Generator().manual_seed(0)
    t, a, b = torch.randn(3, 3, 1, 1, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 4, generator=g)
    ones = {"hada_t2": torch.ones(1, 1, 1, 1), "hada_w2_a": torch.ones(1, 5), "hada_w2_b": torch.ones(1, 4)}
    f = Factored("LoHa", {"hada_t1": t, "hada_w1_a": a, "hada_w1_b": b} | ones, 1.0)
    torch.testing.assert_close(f.delta(torch.Size((5, 4, 1, 1)))[..., 0, 0], a.T @ t[..., 0, 0] @ b)


# ----------------------------------------------------------------------------- a tiny SD pipeline, end to end

def _tucker_by_hand(t, a, b):  # (r, r, kh, kw), (r, out), (r, in) -> (out, in, kh, kw) by matrix products
    return (a.T @ t.permute(2, 3, 0, 1) @ b).permute(2, 3, 0, 1)


def _kron_by_hand(w1, w2):    # (a, c) and (b, d[, kh, kw]) -> (a b, c d[, kh, kw]): block (i, j) is w1[i, j] w2
    a, c = w1.shape
    blocks = w1[:, None, :, None, *([None] * (w2.dim() - 2))] * w2[None, :, None, :]   # (a, b, c, d, ...)
    return blocks.reshape(a * w2.shape[0], c * w2.shape[1], *w2.shape[2:])


def _module_factors(kind: str, shape, i: int, g) -> tuple[dict, float, torch.Tensor]:
    """(factors by key end, alpha, dW = scale * update by hand) of one module of weight `shape`, variant i."""
    def rnd(*s):
        return torch.randn(*s, generator=g) * 0.5
    out, inp, k = shape[0], shape[1], tuple(shape[2:])
    conv3 = k == (3, 3)
    r, alpha = 2, 3.0
    if kind == "lora":
        down, up = rnd(r, inp, *k), rnd(out, r, *([1, 1] if k else []))
        return {"lora_down.weight": down, "lora_up.weight": up}, alpha, \
            (up.reshape(out, r) @ down.reshape(r, -1)).reshape(shape) * alpha / r
    if kind == "loha":
        if conv3 and i % 2:                                               # Tucker cores
            f = {f"hada_{n}": rnd(*s) for n, s in (("t1", (r, r, 3, 3)), ("w1_a", (r, out)), ("w1_b", (r, inp)),
                                                     ("t2", (r, r, 3, 3)), ("w2_a", (r, out)), ("w2_b", (r, inp)))}
            dw = _tucker_by_hand(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * \
                _tucker_by_hand(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        else:                                                             # flattened (r, in * kh * kw)
            f = {f"hada_{n}": rnd(*s) for n, s in (("w1_a", (out, r)), ("w1_b", (r, shape[1:].numel())),
                                                     ("w2_a", (out, r)), ("w2_b", (r, shape[1:].numel())))}
            dw = ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).reshape(shape)
        return f, alpha, dw * alpha / r
    b, d = out // 2, inp // 2                                             # W1 (2, 2), W2 (out / 2, in / 2, ...)
    v = i % 3
    if v == 0:                                                            # W1 low-rank (rank 1), W2 full
        f = {"lokr_w1_a": rnd(2, 1), "lokr_w1_b": rnd(1, 2), "lokr_w2": rnd(b, d, *k)}
        w1, w2, scale = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w2"], alpha / 1
    elif v == 1 and conv3:                                                # W2 a Tucker core
        f = {"lokr_w1": rnd(2, 2), "lokr_t2": rnd(r, r, 3, 3), "lokr_w2_a": rnd(r, b), "lokr_w2_b": rnd(r, d)}
        w1, w2, scale = f["lokr_w1"], _tucker_by_hand(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"]), alpha / r
    elif v == 1:                                                          # W2 low-rank, flattened for a conv
        f = {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d * max(1, shape[2:].numel()))}
        w1, w2, scale = f["lokr_w1"], (f["lokr_w2_a"] @ f["lokr_w2_b"]).reshape(b, d, *k), alpha / r
    else:                                                                 # both full: alpha does not apply
        f = {"lokr_w1": rnd(2, 2), "lokr_w2": rnd(b, d, *k)}
        w1, w2, scale = f["lokr_w1"], f["lokr_w2"], 1.0
    return f, alpha, _kron_by_hand(w1, w2) * scale


def _lycoris_file(theirs, kind: str, seed: int = 0, dora: bool = False) -> tuple[dict, dict, dict]:
    """(the file's tensors, {diffusers U-Net param: (dW, DoRA's m or None)}, {CLIP param: the same}) for attention,
    resnet convs, proj_in and CLIP q / v / fc1 of the diffusers pipeline `theirs`; kind "mixed": LoRA, LoHa, LoKr in
    turn; `dora`: every other module has a dora_scale, per output row and per input column in turn."""
    g = torch.Generator().manual_seed(seed)
    state, deltas = {}, ({}, {})
    parts = ((theirs.unet, "lora_unet_", ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in")),
             (theirs.text_encoder, "lora_te_", ("q_proj", "v_proj", "fc1")))
    i = 0
    for (model, prefix, ends), delta in zip(parts, deltas):
        for name, m in model.named_modules():
            if not name.endswith(ends):
                continue
            this = ("lora", "loha", "lokr")[i % 3] if kind == "mixed" else kind
            f, alpha, dw = _module_factors(this, m.weight.shape, i // 3 if kind == "mixed" else i, g)
            key = prefix + name.replace(".", "_")
            state |= {f"{key}.{end}": t.contiguous() for end, t in f.items()} | {f"{key}.alpha": torch.tensor(alpha)}
            magnitude = None
            if dora and i % 2 == 0:
                w = m.weight.detach()
                dims = [d for d in range(w.dim()) if d != (i // 2) % 2]     # the norm's axis: 0 rows, 1 columns
                magnitude = (w * w).sum(dims, keepdim=True).sqrt()
                magnitude = magnitude * (torch.rand(magnitude.shape, generator=g) + 0.5)
                state[f"{key}.dora_scale"] = magnitude
            delta[f"{name}.weight"] = (dw, magnitude)
            i += 1
    return state, *deltas


def _add_by_hand(model, delta, scale):
    """W += scale dW, or with DoRA's m, W += scale (m (W + dW) / ||W + dW|| - W), the norm along m's axis."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, (dw, m) in delta.items():
            w = params[name]
            if m is None:
                w.add_(scale * dw)
                continue
            v = w + dw
            rows = m.shape[0] == v.shape[0]
            norm = v.flatten(1).norm(dim=1) if rows else v.transpose(0, 1).flatten(1).norm(dim=1)
            w.add_(scale * (m * v / norm.reshape(m.shape) - w))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    write_sd_pipeline(folder)
    convert(str(folder / "sd"), str(folder / "model"), guidance=3.0)
    return folder


@pytest.mark.parametrize("kind,scale", [("loha", 1.0), ("lokr", 0.8), ("mixed", 1.0), ("mixed+dora", 0.7)])
def test_file_draws_what_diffusers_draws_with_dw_added_by_hand(tiny_sd, tmp_path, one_thread, kind, scale):
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd / "sd"), safety_checker=None)
    state, unet_dw, text_dw = _lycoris_file(theirs, kind.removesuffix("+dora"), dora=kind.endswith("+dora"))
    ends = {k.split(".", 1)[1] for k in state}                          # every layout meant is there
    assert ends >= {"loha": {"hada_t1", "hada_w1_b"}, "lokr": {"lokr_t2", "lokr_w1_a", "lokr_w2_b", "lokr_w2"},
                    "mixed": {"lora_down.weight", "hada_t1", "lokr_w1_a", "lokr_w1"},
                    "mixed+dora": {"dora_scale"}}[kind]
    save_file(state, str(tmp_path / "lyco.safetensors"))
    pipe = TextToImage.from_folder(str(tiny_sd / "model"), decoder_precision="fp32")
    before = diffusers_images(theirs, pipe, PROMPTS, 3, 4.0)
    assert pipe.add_lora(str(tmp_path / "lyco.safetensors"), scale) == len(unet_dw) + len(text_dw)
    images, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    _add_by_hand(theirs.unet, unet_dw, scale)
    _add_by_hand(theirs.text_encoder, text_dw, scale)
    reference = diffusers_images(theirs, pipe, PROMPTS, 3, 4.0)
    assert (reference - before).abs().max() > 0.05                       # the update changes the picture
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=3e-4, rtol=0)


def test_merge_lora_bakes_lycoris_into_a_copy(tiny_sd, tmp_path, one_thread):
    from ldm.models.merge_lora import merge
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd / "sd"), safety_checker=None)
    state, unet_dw, text_dw = _lycoris_file(theirs, "mixed", seed=1, dora=True)
    save_file(state, str(tmp_path / "lyco.safetensors"))
    assert merge(str(tiny_sd / "model"), [(str(tmp_path / "lyco.safetensors"), 0.5)], str(tmp_path / "baked")) \
        == len(unet_dw) + len(text_dw)
    live = TextToImage.from_folder(str(tiny_sd / "model"), decoder_precision="fp32")
    live.add_lora(str(tmp_path / "lyco.safetensors"), 0.5)
    baked = TextToImage.from_folder(str(tmp_path / "baked"), decoder_precision="fp32")
    for a, b in ((live.unet, baked.unet), (live.text_encoder.model, baked.text_encoder.model)):
        theirs_state = b.state_dict()
        for k, v in a.state_dict().items():
            torch.testing.assert_close(theirs_state[k], v, atol=1e-6, rtol=0)


def test_sdxl_file_in_sgm_names_draws_what_diffusers_draws(tmp_path, one_thread):
    """kohya's SDXL naming: the U-Net in CompVis / sgm names (lora_unet_input_blocks_4_1_...), the two CLIPs as
    lora_te1_ / lora_te2_ (transformers 4's text_model_ names); LoHa and LoKr in turn, dW added by hand to
    diffusers' SDXL pipeline."""
    from sd_layouts import unet_to_compvis, write_sdxl_pipeline
    theirs = write_sdxl_pipeline(tmp_path)
    convert(str(tmp_path / "sdxl"), str(tmp_path / "model"), guidance=3.0)
    g, weights = torch.Generator().manual_seed(0), theirs.unet.state_dict()
    compvis = {id(v): k for k, v in unet_to_compvis(weights, levels=len(theirs.unet.config.block_out_channels),
                                                    n=theirs.unet.config.layers_per_block).items()}
    state, deltas, i = {}, [{}, {}, {}], 0
    targets = ((theirs.unet, "unet", ("to_q", "to_out.0", "resnets.0.conv1", "proj_in")),
               (theirs.text_encoder, "te1", ("q_proj", "fc1")), (theirs.text_encoder_2, "te2", ("v_proj", "fc2")))
    for (model, part, ends), delta in zip(targets, deltas):
        for name, m in model.named_modules():
            if not name.endswith(ends):
                continue
            module = compvis[id(weights[f"{name}.weight"])][len("model.diffusion_model."):-len(".weight")] \
                if part == "unet" else "text_model." + name.removeprefix("text_model.")
            key = f"lora_{part}_" + module.replace(".", "_")
            f, alpha, dw = _module_factors(("loha", "lokr")[i % 2], m.weight.shape, i // 2, g)
            state |= {f"{key}.{end}": t.contiguous() for end, t in f.items()} | {f"{key}.alpha": torch.tensor(alpha)}
            delta[f"{name}.weight"] = (dw, None)
            i += 1
    assert any(k.startswith("lora_unet_input_blocks_") for k in state) and all(deltas)
    save_file(state, str(tmp_path / "lyco.safetensors"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    before = diffusers_images(theirs, pipe, PROMPTS, 3, 4.0)
    assert pipe.add_lora(str(tmp_path / "lyco.safetensors"), 0.8) == i
    images, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    for model, delta in zip((theirs.unet, theirs.text_encoder, theirs.text_encoder_2), deltas):
        _add_by_hand(model, delta, 0.8)
    reference = diffusers_images(theirs, pipe, PROMPTS, 3, 4.0)
    assert (reference - before).abs().max() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=3e-4, rtol=0)


# ----------------------------------------------------------------------------- refusals

def test_bad_lycoris_files_are_refused_by_key_and_change_nothing(tiny_sd, tmp_path):
    pipe = TextToImage.from_folder(str(tiny_sd / "model"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"      # a (64, 64) weight
    good = {f"{q}.lokr_w1": torch.ones(2, 2), f"{q}.lokr_w2_a": torch.ones(32, 2),
            f"{q}.lokr_w2_b": torch.ones(2, 32), f"{q}.alpha": torch.tensor(1.0)}
    cases = {
        "shape": (good | {f"{q}.lokr_w2_b": torch.ones(2, 16)},
                  rf"'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q': LoKr factors {q}.lokr_w1 \(2, 2\)"
                  r".* make a \(64, 32\) update, which does not fit a weight of shape \(64, 64\)"),
        "inner": (good | {f"{q}.lokr_w2_b": torch.ones(3, 32)}, rf"{q}.lokr_w2_a \(32, 2\).* do not combine"),
        "incomplete": ({f"{q}.hada_w1_a": torch.ones(64, 2), f"{q}.hada_w1_b": torch.ones(2, 64),
                        f"{q}.hada_w2_a": torch.ones(64, 2)}, f"LoHa module {q} has no hada_w2_b"),
        "two kinds": (good | {f"{q}.hada_w1_a": torch.ones(64, 2)}, "has both LoHa"),
        "lora too": (good | {f"{q}.lora_down.weight": torch.ones(2, 64)}, "has both LoRA"),
        "dora shape": (good | {f"{q}.dora_scale": torch.ones(32, 1)},
                       rf"{q}.dora_scale \(32, 1\) is neither one magnitude per output row"),
    }
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=message):
            pipe.add_lora(str(tmp_path / f"{name}.safetensors"))
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    save_file(good, str(tmp_path / "good.safetensors"))
    assert pipe.add_lora(str(tmp_path / "good.safetensors")) == 1


# ----------------------------------------------------------------------------- DoRA (dora_scale)

@pytest.mark.parametrize("spelling", ["(out, 1)", "(out,)"])
def test_dora_merge_equals_peft_dora_merge(tmp_path, spelling):
    """A kohya LoRA with LyCORIS's dora_scale = peft's LoRA with use_dora, merged by peft (Liu et al. 2024, eq. 5)."""
    toy, scale = _toy(), 0.6
    config = peft.LoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights=False, target_modules=["fc", "conv"])
    wrapped = peft.get_peft_model(copy.deepcopy(toy), config)
    state = {}
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            m = re.fullmatch(r"base_model\.model\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector)\.default\.weight", name)
            if not m:
                continue
            p.mul_(torch.rand(p.shape) + 0.5) if m[2] == "lora_magnitude_vector" else p.normal_(0, 0.3)
            out = toy[m[1]].weight.shape[0]
            end = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}[m[2]]
            value = p.detach().clone()
            if end == "dora_scale":          # peft: (out,) for a Linear, (1, out, 1, 1) for a conv
                value = value.reshape(out) if spelling == "(out,)" else \
                    value.reshape(out, *[1] * (toy[m[1]].weight.dim() - 1))
            state[f"lora_te_{m[1]}.{end}"] = value.contiguous()
    theirs = wrapped.merge_and_unload()
    assert len(state) == 6
    ours = _our_merge(toy, state, 6, tmp_path, scale)
    for name in ("fc", "conv"):
        w0, w1 = toy[name].weight, theirs[name].weight
        assert (w1 - w0).abs().max() > 1e-2, name
        torch.testing.assert_close(ours[name].weight, w0 + scale * (w1 - w0), atol=1e-5, rtol=1e-5)


def test_dora_closed_forms(tmp_path):
    """W + dW = [[1, 2], [4, 0]] rescaled per output row (m = [[5], [2]]) or per input column (m = [[2, 3]])."""
    toy = nn.ModuleDict({"fc": nn.Linear(2, 2, bias=False)})
    with torch.no_grad():
        toy["fc"].weight.copy_(torch.tensor([[1., 2.], [2., 0.]]))
    lora = {"lora_te_fc.lora_down.weight": torch.tensor([[1., 0.]]), "lora_te_fc.lora_up.weight": torch.tensor([[0.], [2.]])}
    r5, r17 = 5 ** 0.5, 17 ** 0.5
    rows = torch.tensor([[1 / r5 * 5, 2 / r5 * 5], [2., 0.]])          # rows of norm sqrt(5), 4 -> 5, 2
    cols = torch.tensor([[2 / r17, 3.], [8 / r17, 0.]])                # columns of norm sqrt(17), 2 -> 2, 3
    for m, hand in ((torch.tensor([[5.], [2.]]), rows), (torch.tensor([[2., 3.]]), cols)):
        for scale in (1.0, 0.5):
            ours = _our_merge(toy, lora | {"lora_te_fc.dora_scale": m}, 1.0, tmp_path, scale)
            torch.testing.assert_close(ours["fc"].weight, toy["fc"].weight + scale * (hand - toy["fc"].weight))


@pytest.mark.parametrize("axis", [0, 1])
def test_dora_on_lokr_sets_the_norms_to_m(tmp_path, axis):
    """DoKr: at scale 1 each output row's (input column's) norm is its m, its direction that of W + dW."""
    g = torch.Generator().manual_seed(0)
    toy = _toy()
    f, _, dw = _module_factors("lokr", toy["fc"].weight.shape, 1, g)
    m = torch.rand(96, 1, generator=g) + 0.5 if axis == 0 else torch.rand(1, 64, generator=g) + 0.5
    state = {f"lora_te_fc.{k}": v for k, v in f.items()} | {"lora_te_fc.dora_scale": m}
    state |= {f"lora_te_conv.{k}": v for k, v in _module_factors("loha", toy["conv"].weight.shape, 0, g)[0].items()}
    w = _our_merge(toy, state, 3.0, tmp_path, 1.0)["fc"].weight
    norms = w.norm(dim=1 - axis, keepdim=True)
    torch.testing.assert_close(norms, m, atol=1e-5, rtol=1e-5)
    target = toy["fc"].weight + dw
    torch.testing.assert_close(w / norms, target / target.norm(dim=1 - axis, keepdim=True), atol=1e-5, rtol=1e-5)


def test_transformer_lycoris_in_diffusers_names_is_per_module(tmp_path):
    """SD3's transformer, kohya's diffusers-named module: W1 kron W2 (both full: scale 1) added to that one layer
    (fused modules: test_lycoris_transformers)."""
    from ldm.models.mmdit import MMDiT, MMDiTConfig
    net = MMDiT(MMDiTConfig(in_channels=4, out_channels=4, depth=2, num_heads=2, head_dim=8, context_dim=16,
                            caption_dim=16, pooled_dim=16, pos_embed_max_size=8, sample_size=8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    key = "lora_transformer_transformer_blocks_0_attn_to_q"
    w1, w2 = torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.arange(64.0).reshape(8, 8) / 64
    save_file({f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.alpha": torch.tensor(4.0)},
              str(tmp_path / "l.safetensors"))
    assert merge_lora(read_lora(str(tmp_path / "l.safetensors")), [net], {}, 0.5) == 1
    after = net.state_dict()
    torch.testing.assert_close(after["blocks.0.image.attn.q.weight"] - before["blocks.0.image.attn.q.weight"],
                               0.5 * _kron_by_hand(w1, w2), atol=1e-6, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in after.items() if k != "blocks.0.image.attn.q.weight")
