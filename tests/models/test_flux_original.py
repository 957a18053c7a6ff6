"""FLUX.1's original (Black Forest Labs) layout: the key mapping against diffusers' own single-file converter,
the sizes read off the tensors, and a tiny model loaded from BFL names computing diffusers' output."""
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from ldm.models.convert_flux import (
    ORIGINAL_DOUBLE, ORIGINAL_SINGLE, ORIGINAL_TOP, flux_config_from_diffusers, flux_config_from_original,
    load_original_flux, original_to_diffusers,
)
from tests.models.test_flux import DEV, SCHNELL, _inputs, _reference, _theirs

WIDTH, HEAD = 3072, 128   # diffusers' converter assumes FLUX.1's real width


def _bfl_rows(width: int) -> dict[str, int]:
    """Output rows of each BFL module of a width-`width` FLUX.1 (one double and one single block shown as N)."""
    top = {"img_in": width, "txt_in": width, "time_in.in_layer": width, "time_in.out_layer": width,
           "vector_in.in_layer": width, "vector_in.out_layer": width, "guidance_in.in_layer": width,
           "guidance_in.out_layer": width, "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * width}
    double = {"img_mod.lin": 6 * width, "txt_mod.lin": 6 * width, "img_attn.qkv": 3 * width,
              "txt_attn.qkv": 3 * width, "img_attn.proj": width, "txt_attn.proj": width,
              "img_mlp.0": 4 * width, "img_mlp.2": width, "txt_mlp.0": 4 * width, "txt_mlp.2": width}
    single = {"modulation.lin": 3 * width, "linear1": 7 * width, "linear2": width}
    return top, double, single


def _numbered_bfl(depth=(2, 2), guidance=True) -> dict[str, torch.Tensor]:
    """A BFL state dict with FLUX.1's row counts but one input column, every element a distinct number, so
    that any misplaced row, swapped half or wrong split shows; norms' gains under `.scale`."""
    top, double, single = _bfl_rows(WIDTH)
    modules = dict(top) if guidance else {k: v for k, v in top.items() if not k.startswith("guidance_in")}
    for i in range(depth[0]):
        modules.update({f"double_blocks.{i}.{k}": v for k, v in double.items()})
    for i in range(depth[1]):
        modules.update({f"single_blocks.{i}.{k}": v for k, v in single.items()})
    state, n = {}, 0
    for module, rows in modules.items():
        for param, shape in (("weight", (rows, 1)), ("bias", (rows,))):
            state[f"{module}.{param}"] = torch.arange(n, n + rows, dtype=torch.float64).reshape(shape)
            n += rows
    norms = [f"double_blocks.{i}.{s}_attn.norm.{q}_norm" for i in range(depth[0]) for s in ("img", "txt")
             for q in ("query", "key")] + [f"single_blocks.{i}.norm.{q}_norm" for i in range(depth[1])
                                           for q in ("query", "key")]
    for module in norms:
        state[f"{module}.scale"] = torch.arange(n, n + HEAD, dtype=torch.float64)
        n += HEAD
    return state


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_mapping_matches_diffusers_converter(guidance):
    state = _numbered_bfl(guidance=guidance)
    expected = convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in state.items()})
    ours = original_to_diffusers(state)
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


def test_tables_cover_every_module():
    """Every row-count entry above is one of our original names, and the reverse (no name left untested)."""
    top, double, single = _bfl_rows(WIDTH)
    assert set(top) == set(ORIGINAL_TOP)
    assert set(double) | {f"{s}_attn.norm.{q}_norm" for s in ("img", "txt") for q in ("query", "key")} \
        == set(ORIGINAL_DOUBLE)
    assert set(single) | {"norm.query_norm", "norm.key_norm"} == set(ORIGINAL_SINGLE)


def _to_original(diffusers_state: dict) -> dict:
    """diffusers' tensors under BFL's names: each BFL module the concatenation of its parts in row order (the
    order the mapping test above pins against diffusers' converter), the final halves swapped back."""
    from ldm.models.convert_flux import _ORIGINAL_BLOCKS, original_modules, original_swaps_halves
    modules = list(ORIGINAL_TOP)
    for name, (theirs, table) in _ORIGINAL_BLOCKS.items():
        count = len({k.split(".")[1] for k in diffusers_state if k.startswith(theirs + ".")})
        modules += [f"{name}.{i}.{m}" for i in range(count) for m in table]
    out = {}
    for module in modules:
        parts = original_modules(module)
        for param in ("weight", "bias"):
            if f"{parts[0]}.{param}" not in diffusers_state:
                continue
            value = torch.cat([diffusers_state[f"{p}.{param}"] for p in parts])
            if original_swaps_halves(module):
                value = torch.cat(value.chunk(2)[::-1])
            out[f"{module}.{'scale' if module.endswith('_norm') else param}"] = value
    return out


@pytest.mark.parametrize("overrides", [DEV, SCHNELL], ids=["dev", "schnell"])
def test_loads_original_file_and_matches_diffusers(overrides):
    ref = _reference(**overrides)
    state = _to_original(ref.state_dict())
    assert len(state) < len(ref.state_dict())         # the fused projections really are fused
    full = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    full["vae.decoder.conv_in.weight"] = torch.zeros(1)   # a bundled part outside the transformer is ignored
    cfg = flux_config_from_original(state, axes_dims_rope=ref.config.axes_dims_rope)
    assert cfg == flux_config_from_diffusers(dict(ref.config))
    ours = load_original_flux(full, cfg).eval()
    x, sigma, ctx, pooled, guidance = _inputs(cfg)
    with torch.no_grad():
        out = ours(x, sigma * 1000, ctx, pooled=pooled, guidance=guidance)
    torch.testing.assert_close(out, _theirs(ref, x, sigma, ctx, pooled, guidance), atol=1e-5, rtol=1e-5)


def test_config_read_off_real_sizes():
    state = _numbered_bfl(depth=(3, 5))
    state["img_in.weight"] = torch.zeros(WIDTH, 64)
    state["txt_in.weight"] = torch.zeros(WIDTH, 4096)
    state["vector_in.in_layer.weight"] = torch.zeros(WIDTH, 768)
    cfg = flux_config_from_original(state)
    assert (cfg.depth_double, cfg.depth_single, cfg.num_heads, cfg.head_dim) == (3, 5, 24, 128)
    assert (cfg.in_channels, cfg.out_channels, cfg.context_dim, cfg.pooled_dim) == (16, 16, 4096, 768)
    assert cfg.guidance_embeds and cfg.axes_dims_rope == (16, 56, 56)


def test_refusals():
    state = _to_original(_reference(**DEV).state_dict())
    with pytest.raises(ValueError, match="128"):          # a head size FLUX.1 never had needs its config
        flux_config_from_original(state)
    with pytest.raises(ValueError, match="txt_in.weight"):
        flux_config_from_original({k: v for k, v in state.items() if k != "txt_in.weight"})
    gap = {k.replace("double_blocks.1.", "double_blocks.2."): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"double_blocks \[0, 2\] are not 0..1"):
        flux_config_from_original(gap, axes_dims_rope=(4, 6, 6))
    cfg = flux_config_from_original(state, axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match=r"missing keys: \['single_blocks.1.out.bias'"):
        load_original_flux({k: v for k, v in state.items() if not k.startswith("single_blocks.1.linear2")}, cfg)
