"""LyCORIS LoKr / LoHa (and DoRA) files on SD3's and FLUX.1's transformers (ldm.models.lora, lora_flux, lycoris):
kohya's files in FLUX.1's original (BFL) names fuse q, k, v (and a single block's MLP input) in one module, whose
dW (kron / Hadamard products written out here) covers the whole fused weight; merged, ours equal diffusers'
weights with that dW cut by hand into their rows and added, and draw the same images. DoRA's norms on a fused
module are taken on the stacked weight; bad shapes are refused by key with the model untouched."""
import pytest
import torch
from safetensors.torch import save_file

from ldm.models.convert_flux import diffusers_to_ours as flux_to_ours
from ldm.models.convert_mmdit import diffusers_to_ours as mmdit_to_ours
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage
from sd_layouts import FLUX_TRANSFORMER, PROMPTS, SD3_TRANSFORMER, flux_images, sd3_images, write_flux_pipeline, \
    write_sd3_pipeline

diffusers = pytest.importorskip("diffusers")

R, ALPHA, SCALE, STEPS = 2, 3.0, 0.7, 2
D = FLUX_TRANSFORMER["num_attention_heads"] * FLUX_TRANSFORMER["attention_head_dim"]   # 32: FLUX's width here
S = SD3_TRANSFORMER["num_attention_heads"] * SD3_TRANSFORMER["attention_head_dim"]     # 32: SD3's
# BFL module -> (diffusers modules stacked by rows in this order, swap: BFL holds (shift, scale) halves), written
# out from BFL's model code (a single block's linear1: q, k, v, then the 4x MLP input)
FLUX_FUSED = {"double_blocks.0.img_attn.qkv": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                "transformer_blocks.0.attn.to_v"], False),
              "double_blocks.0.txt_attn.qkv": (["transformer_blocks.0.attn.add_q_proj",
                                                "transformer_blocks.0.attn.add_k_proj",
                                                "transformer_blocks.0.attn.add_v_proj"], False),
              "single_blocks.1.linear1": (["single_transformer_blocks.1.attn.to_q",
                                           "single_transformer_blocks.1.attn.to_k",
                                           "single_transformer_blocks.1.attn.to_v",
                                           "single_transformer_blocks.1.proj_mlp"], False),
              "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
              "double_blocks.0.img_mlp.0": (["transformer_blocks.0.ff.net.0.proj"], False)}
# sd-scripts' SD3 names: block 1 is the last, whose text query diffusers has and ours drops (no effect)
SD3_FUSED = {"joint_blocks.0.x_block.attn.qkv": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                  "transformer_blocks.0.attn.to_v"], False),
             "joint_blocks.1.context_block.attn.qkv": (["transformer_blocks.1.attn.add_q_proj",
                                                        "transformer_blocks.1.attn.add_k_proj",
                                                        "transformer_blocks.1.attn.add_v_proj"], False),
             "joint_blocks.1.context_block.adaLN_modulation.1": (["transformer_blocks.1.norm1_context.linear"], True),
             "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
             "joint_blocks.0.x_block.mlp.fc1": (["transformer_blocks.0.ff.net.0.proj"], False)}


def _swap(rows):
    return torch.cat(rows.chunk(2)[::-1])


def _kron(w1, w2):   # (a, c), (b, d) -> (a b, c d): block (i, j) is w1[i, j] w2
    return torch.cat([torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], 1) for i in range(w1.shape[0])])


def _factors(kind: str, out: int, inp: int, g) -> tuple[dict, torch.Tensor]:
    """(the file's factors by key end, dW with alpha / r) of one module: LoKr with a full 2x2 W1 and a rank-R W2,
    or LoHa's two rank-R products multiplied entrywise."""
    def rnd(*s):
        return torch.randn(*s, generator=g) * 0.6
    if kind == "lokr":
        f = {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(out // 2, R), "lokr_w2_b": rnd(R, inp // 2)}
        return f, _kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"]) * ALPHA / R
    f = {"hada_w1_a": rnd(out, R), "hada_w1_b": rnd(R, inp), "hada_w2_a": rnd(out, R), "hada_w2_b": rnd(R, inp)}
    return f, (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * ALPHA / R


def _file(path, fused: dict, params: dict, kind: str, seed: int = 0, dora: dict | None = None) -> dict:
    """Write a kohya LyCORIS file (lora_unet_<original module>) over `fused` for the diffusers weights `params`;
    returns {original module: its fused dW}. dora: {original module: dora_scale}."""
    g, state, deltas = torch.Generator().manual_seed(seed), {}, {}
    for module, (parts, _) in fused.items():
        rows = sum(params[f"{p}.weight"].shape[0] for p in parts)
        f, deltas[module] = _factors(kind, rows, params[f"{parts[0]}.weight"].shape[1], g)
        key = "lora_unet_" + module.replace(".", "_")
        state |= {f"{key}.{k}": v.contiguous() for k, v in f.items()} | {f"{key}.alpha": torch.tensor(ALPHA)}
        if dora and module in dora:
            state[f"{key}.dora_scale"] = dora[module]
    save_file(state, str(path))
    return deltas


def _add_by_hand(params: dict, fused: dict, deltas: dict, scale: float) -> None:
    """W += scale dW on diffusers' weights, each fused dW cut into its parts' rows (halves swapped back first)."""
    with torch.no_grad():
        for module, (parts, swap) in fused.items():
            dw = _swap(deltas[module]) if swap else deltas[module]
            start = 0
            for p in parts:
                w = params[f"{p}.weight"]
                w.add_(scale * dw[start:start + w.shape[0]])
                start += w.shape[0]
            assert start == dw.shape[0]


@pytest.fixture(scope="module")
def flux(tmp_path_factory, one_thread_module):
    folder = tmp_path_factory.mktemp("lycoris_flux")
    write_flux_pipeline(folder)
    convert(str(folder / "flux"), str(folder / "model"))
    return folder


@pytest.fixture(scope="module")
def sd3(tmp_path_factory, one_thread_module):
    folder = tmp_path_factory.mktemp("lycoris_sd3")
    write_sd3_pipeline(folder)
    convert(str(folder / "sd3"), str(folder / "model"), guidance=3.0)
    return folder


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_flux_fused_lycoris_is_dw_cut_by_rows_and_draws_what_diffusers_draws(flux, tmp_path, kind):
    """kohya's LoKr / LoHa on BFL's fused qkv, linear1 (q, k, v, MLP input), final (shift, scale) modulation and a
    plain module: our q, k, v, mlp_in, final_mod gain their rows of SCALE * dW, every weight equals diffusers'
    with dW added by hand, and FluxPipeline draws the same images."""
    theirs = diffusers.FluxPipeline.from_pretrained(str(flux / "flux"))
    theirs.set_progress_bar_config(disable=True)
    params = dict(theirs.transformer.named_parameters())
    deltas = _file(tmp_path / "l.safetensors", FLUX_FUSED, params, kind)
    assert deltas["single_blocks.1.linear1"].shape == (7 * D, D)
    pipe = TextToImage.from_folder(str(flux / "model"), decoder_precision="fp32")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert pipe.add_lora(str(tmp_path / "l.safetensors"), SCALE) == 3 + 3 + 4 + 1 + 1
    ours = pipe.unet.state_dict()
    qkv, linear1, final = (deltas[m] for m in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1",
                                                "final_layer.adaLN_modulation.1"))
    by_hand = {"double_blocks.0.image.attn.q": qkv[:D], "double_blocks.0.image.attn.k": qkv[D:2 * D],
               "double_blocks.0.image.attn.v": qkv[2 * D:], "single_blocks.1.q": linear1[:D],
               "single_blocks.1.k": linear1[D:2 * D], "single_blocks.1.v": linear1[2 * D:3 * D],
               "single_blocks.1.mlp_in": linear1[3 * D:], "final_mod": torch.cat([final[D:], final[:D]])}
    for name, dw in by_hand.items():
        torch.testing.assert_close(ours[f"{name}.weight"] - before[f"{name}.weight"], SCALE * dw, atol=1e-6, rtol=0)

    _add_by_hand(params, FLUX_FUSED, deltas, SCALE)
    expected = flux_to_ours(theirs.transformer.state_dict())
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    images = pipe.generate(PROMPTS, steps=STEPS, seed=0)[0] * 0.5 + 0.5
    plain = TextToImage.from_folder(str(flux / "model"), decoder_precision="fp32").generate(PROMPTS, steps=STEPS,
                                                                                            seed=0)[0] * 0.5 + 0.5
    assert (images - plain).abs().max() > 0.01                                          # the update shows
    torch.testing.assert_close(images, flux_images(theirs, pipe, PROMPTS, STEPS, 3.5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_sd3_original_fused_lycoris_is_dw_cut_by_rows_and_draws_what_diffusers_draws(sd3, tmp_path, one_thread,
                                                                                      kind):
    """sd-scripts' SD3 names (fused qkv, the last block's text qkv whose q ours drops, (shift, scale) modulations):
    every weight equals diffusers' with dW cut and added by hand (its last text query dropped), same images."""
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3 / "sd3"))
    theirs.set_progress_bar_config(disable=True)
    params = dict(theirs.transformer.named_parameters())
    deltas = _file(tmp_path / "l.safetensors", SD3_FUSED, params, kind)
    pipe = TextToImage.from_folder(str(sd3 / "model"), decoder_precision="fp32")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert pipe.add_lora(str(tmp_path / "l.safetensors"), SCALE) == 3 + 2 + 1 + 1 + 1
    ours = pipe.unet.state_dict()
    text = deltas["joint_blocks.1.context_block.attn.qkv"]
    for name, dw in (("blocks.1.text.attn.k", text[S:2 * S]), ("blocks.1.text.attn.v", text[2 * S:])):
        torch.testing.assert_close(ours[f"{name}.weight"] - before[f"{name}.weight"], SCALE * dw, atol=1e-6, rtol=0)

    _add_by_hand(params, SD3_FUSED, deltas, SCALE)
    expected = mmdit_to_ours(theirs.transformer.state_dict())
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    images = pipe.generate(PROMPTS, steps=3, seed=0)[0] * 0.5 + 0.5
    torch.testing.assert_close(images, sd3_images(theirs, pipe, PROMPTS, 3, 4.0), atol=3e-4, rtol=0)


def _dora_by_hand(w, dw, m, scale):
    """W + scale (m (W + dW) / ||W + dW|| - W), the norm per output row (m (out, 1)) or input column (m (1, in))."""
    v = w + dw
    return w + scale * (m * v / v.norm(dim=1 if m.shape[0] == v.shape[0] else 0, keepdim=True) - w)


@pytest.mark.parametrize("axis", [0, 1], ids=["per-row", "per-column"])
def test_flux_dora_on_fused_modules_normalises_the_stacked_weight(flux, tmp_path, axis):
    """DoRA (LoKr inside) on BFL's qkv, linear1 and final modulation: our parts are the rows of m (W + dW) /
    ||W + dW|| computed here on the stacked weight (a column's norm over all 3D / 7D rows), (shift, scale) in
    the file's order."""
    pipe = TextToImage.from_folder(str(flux / "model"), decoder_precision="fp32")
    ours = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    stacks = {"double_blocks.0.img_attn.qkv": ["double_blocks.0.image.attn.q", "double_blocks.0.image.attn.k",
                                               "double_blocks.0.image.attn.v"],
              "single_blocks.1.linear1": ["single_blocks.1.q", "single_blocks.1.k", "single_blocks.1.v",
                                          "single_blocks.1.mlp_in"],
              "final_layer.adaLN_modulation.1": ["final_mod"]}
    fused = {m: torch.cat([ours[f"{p}.weight"] for p in parts]) for m, parts in stacks.items()}
    fused["final_layer.adaLN_modulation.1"] = _swap(fused["final_layer.adaLN_modulation.1"])   # BFL's rows
    g = torch.Generator().manual_seed(1)
    dora = {m: torch.rand(w.shape[0], 1, generator=g) + 0.5 if axis == 0 else torch.rand(1, w.shape[1], generator=g)
            + 0.5 for m, w in fused.items()}
    shapes = {f"{m}.weight": w for m, w in fused.items()}                       # the fused modules' shapes
    deltas = _file(tmp_path / "d.safetensors", {m: ([m], False) for m in stacks}, shapes, "lokr", seed=2, dora=dora)
    pipe.add_lora(str(tmp_path / "d.safetensors"), SCALE)
    merged = pipe.unet.state_dict()
    for module, parts in stacks.items():
        expected = _dora_by_hand(fused[module], deltas[module], dora[module], SCALE)
        if module == "final_layer.adaLN_modulation.1":
            expected = _swap(expected)                                                 # back to our (scale, shift)
        got = torch.cat([merged[f"{p}.weight"] for p in parts])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{module}: {m}")
    rest = set(merged) - {f"{p}.weight" for parts in stacks.values() for p in parts}
    assert all(torch.equal(merged[k], ours[k]) for k in rest)


def test_sd3_dora_on_the_last_text_qkv(sd3, tmp_path):
    """The last block's text qkv, whose q ours drops: a per-row m scales k's and v's rows as on the stacked
    weight (each row's norm is its own); a per-column m would need q's rows too: refused by key, nothing changed."""
    pipe = TextToImage.from_folder(str(sd3 / "model"), decoder_precision="fp32")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    module = "joint_blocks.1.context_block.attn.qkv"
    fake = {f"{module}.weight": torch.empty(3 * S, S)}
    g = torch.Generator().manual_seed(3)
    column = torch.rand(1, S, generator=g) + 0.5
    _file(tmp_path / "c.safetensors", {module: ([module], False)}, fake, "loha", dora={module: column})
    with pytest.raises(ValueError, match="lora_unet_joint_blocks_1_context_block_attn_qkv.*per input column"):
        pipe.add_lora(str(tmp_path / "c.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())

    row = torch.rand(3 * S, 1, generator=g) + 0.5
    deltas = _file(tmp_path / "r.safetensors", {module: ([module], False)}, fake, "loha", dora={module: row})
    assert pipe.add_lora(str(tmp_path / "r.safetensors"), SCALE) == 2
    kv = torch.cat([before[f"blocks.1.text.attn.{p}.weight"] for p in "kv"])
    expected = _dora_by_hand(kv, deltas[module][S:], row[S:], SCALE)
    got = torch.cat([pipe.unet.state_dict()[f"blocks.1.text.attn.{p}.weight"] for p in "kv"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_fused_lycoris_is_refused_by_key_and_changes_nothing(flux, tmp_path):
    """A LoKr whose kron is not the fused qkv's shape, a LoHa on linear1 of the wrong width, a dora_scale fitting
    neither axis of the fused weight: each refused naming its key, beside a good module that is not merged."""
    pipe = TextToImage.from_folder(str(flux / "model"), decoder_precision="fp32")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    good = {"lora_unet_double_blocks_0_txt_attn_qkv.lokr_w1": torch.ones(2, 2),
            "lora_unet_double_blocks_0_txt_attn_qkv.lokr_w2": torch.ones(3 * D // 2, D // 2)}
    qkv, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
    cases = [({f"{qkv}.lokr_w1": torch.ones(2, 2), f"{qkv}.lokr_w2": torch.ones(D, D // 2)},      # (2D, D): not 3D
              rf"{qkv}.* make a \(64, 32\) update, which does not fit a weight of shape \(96, 32\)"),
             ({f"{linear1}.hada_w1_a": torch.ones(7 * D, 1), f"{linear1}.hada_w1_b": torch.ones(1, D + 1),
               f"{linear1}.hada_w2_a": torch.ones(7 * D, 1), f"{linear1}.hada_w2_b": torch.ones(1, D + 1)},
              rf"{linear1}.* does not fit a weight of shape \(224, 32\)"),
             ({**good, "lora_unet_double_blocks_0_txt_attn_qkv.dora_scale": torch.ones(D, 1)},
              r"lora_unet_double_blocks_0_txt_attn_qkv\.dora_scale \(32, 1\) is neither")]
    for i, (tensors, message) in enumerate(cases):
        save_file(good | tensors, str(tmp_path / f"bad{i}.safetensors"))
        with pytest.raises(ValueError, match=message):
            pipe.add_lora(str(tmp_path / f"bad{i}.safetensors"))
        assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    save_file(good, str(tmp_path / "good.safetensors"))
    assert pipe.add_lora(str(tmp_path / "good.safetensors")) == 3
