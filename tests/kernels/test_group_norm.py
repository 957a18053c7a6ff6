"""Fused GroupNorm(+SiLU) kernel vs an fp32 PyTorch reference: output and every gradient.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes are small; target_programs / max_tile force the chunked and multi-tile code paths.
"""
import pytest
import torch
import torch.nn.functional as F

from ldm.kernels.group_norm import fused_group_norm, group_norm_reference, launch_plan

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# label: (shape, groups, channels_last, activation, affine, target_programs, max_tile)
CASES = {
    "group of 70, one tile, no split": ((2, 8, 5, 7), 4, False, None, True, 1, 4096),
    "group not a multiple of the block, many tiles and chunks":
        ((2, 12, 5, 7), 3, False, "silu", True, 8, 16),  # 2 chunks x 5 tiles per group
    "channels_last, silu": ((2, 12, 6, 5), 4, True, "silu", True, 32, 32),
    "C=320, 32 groups, batch 1": ((1, 320, 4, 4), 32, False, "silu", True, 64, 4096),
    "weight and bias None": ((2, 16, 3, 3), 4, False, "silu", False, 16, 4096),
    "split along channels too": ((1, 24, 3, 3), 1, True, None, True, 64, 8),
    "loop over channel tiles in a chunk": ((1, 24, 3, 3), 2, False, "silu", True, 2, 8),
    "(N, C, L) input, batch 1": ((1, 8, 10), 2, False, "silu", True, 8, 4096),
    "1x1 spatial, 4-element groups": ((3, 32, 1, 1), 8, False, None, True, 4, 4096),
}
# dtype: (atol, rtol) for fp32; low precision uses the "2x PyTorch's own error" rule below.
DTYPES = {torch.float32: (2e-5, 2e-5), torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(shape, channels_last, affine, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0 + 0.5).to(device, dtype)  # mean != 0 on purpose
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (1.0 + 0.5 * torch.randn(c, generator=g)).to(device, dtype) if affine else None
    b = (0.3 * torch.randn(c, generator=g)).to(device, dtype) if affine else None
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, b, dy


def _grads(fn, x, w, b, dy):
    """Output and grads (x, w, b) of fn(x, w, b) under upstream grad dy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return [y.detach(), *grads]


def _fp32(*tensors):
    """fp32 copies (None stays None), so reference grads are not rounded to the test dtype."""
    return [t.float() if t is not None else None for t in tensors]


def _torch_in_dtype(groups, activation):
    """PyTorch's own low-precision path: the yardstick for our low-precision error."""
    def fn(x, w, b):
        y = F.group_norm(x, groups, w, b, 1e-5)
        return F.silu(y) if activation == "silu" else y
    return fn


def _assert_close(name, got, ref, torch_own, dtype):
    if dtype == torch.float32:
        atol, rtol = DTYPES[dtype]
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    own = (torch_own.float() - ref.float()).abs().max().item()
    bound = 2.0 * own + DTYPES[dtype] * max(1.0, scale)
    assert err <= bound, (f"{name}: max error {err:.3g} > 2 x PyTorch's {own:.3g} + atol "
                          f"({bound:.3g})")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_reference(case, dtype):
    shape, groups, channels_last, activation, affine, programs, tile = CASES[case]
    if dtype != torch.float32 and not CUDA and case not in (
            "channels_last, silu", "group not a multiple of the block, many tiles and chunks"):
        pytest.skip("interpreter time budget: low precision runs on two CPU cases")
    x, w, b, dy = _inputs(shape, channels_last, affine, dtype)

    def ours(x, w, b):
        return fused_group_norm(x, groups, w, b, activation=activation,
                                target_programs=programs, max_tile=tile)

    got = _grads(ours, x, w, b, dy)
    ref = _grads(lambda x, w, b: group_norm_reference(x, groups, w, b, activation=activation),
                 *_fp32(x, w, b, dy))
    own = _grads(_torch_in_dtype(groups, activation), x, w, b, dy) if dtype != torch.float32 \
        else ref
    assert got[0].dtype == dtype and got[0].stride() == x.stride()  # no layout change
    for name, g, r, o in zip(("y", "dx", "dweight", "dbias"), got, ref, own):
        _assert_close(f"{case} {name}", g, r, o, dtype)


def test_custom_op_and_eager_door_agree_bitwise():
    """fused_group_norm runs an autograd.Function in eager mode and the custom op (what
    torch.compile sees) otherwise: same kernels, so outputs and gradients match exactly."""
    x, w, b, dy = _inputs((2, 64, 5, 7), False, True, torch.float32)
    eager = _grads(lambda x, w, b: fused_group_norm(x, 8, w, b, activation="silu", target_programs=8), x, w, b, dy)
    op = _grads(lambda x, w, b: torch.ops.ldm.group_norm_fwd(x, w, b, 8, 1e-5, True, 8, 4096)[0], x, w, b, dy)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


def test_inference_door_matches_and_records_no_graph():
    """Without grad fused_group_norm launches directly: no autograd node, same output bits."""
    x, w, b = (t.requires_grad_() for t in _inputs((2, 64, 5, 7), False, True, torch.float32)[:3])

    def run(x, w, b):
        return fused_group_norm(x, 8, w, b, activation="silu", target_programs=8)
    with_grad = run(x, w, b)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        no_grad = run(x, w, b)
    plain = run(x.detach(), w.detach(), b.detach())
    for out in (no_grad, plain):
        assert out.grad_fn is None and torch.equal(out, with_grad.detach())


def test_deterministic_bitwise():
    """Two runs of forward and backward give identical bits (no atomics, fixed order)."""
    shape, groups = (2, 12, 5, 7), 3
    x, w, b, dy = _inputs(shape, False, True, torch.float32)

    def ours(x, w, b):
        return fused_group_norm(x, groups, w, b, activation="silu", target_programs=64, max_tile=16)

    first, second = _grads(ours, x, w, b, dy), _grads(ours, x, w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_broadcast_upstream_grad_and_sliced_input():
    """y.sum() gives a stride-0 dy; a sliced spatial view takes the copy path. Both correct."""
    base = torch.randn(2, 8, 6, 9, device=DEVICE) + 1.0
    x = base[..., :7].clone().requires_grad_()
    x_view = x[..., 1:6]  # spatial dims no longer flatten to one stride
    fused_group_norm(x_view, 2, target_programs=8).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    F.group_norm(ref_x[..., 1:6], 2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,groups,cg,length,programs,tile", [
    (2, 32, 10, 4096, 528, 4096), (1, 32, 40, 64, 528, 4096), (1, 1, 12, 6, 64, 8),
    (2, 32, 80, 256, 528, 4096), (32, 32, 10, 4096, 528, 4096), (1, 4, 3, 7, 1, 2),
])
def test_launch_plan_covers_each_group_once(n, groups, cg, length, programs, tile):
    p = launch_plan(n, groups, cg, length, programs, tile)
    assert p["BLOCK_C"] * p["BLOCK_L"] <= tile
    assert p["CHUNK_C"] % p["BLOCK_C"] == 0 and p["CHUNK_L"] % p["BLOCK_L"] == 0
    # Chunks tile the group exactly: the last one starts inside it, together they cover it.
    assert (p["CHUNKS_C"] - 1) * p["CHUNK_C"] < cg <= p["CHUNKS_C"] * p["CHUNK_C"]
    assert (p["CHUNKS_L"] - 1) * p["CHUNK_L"] < length <= p["CHUNKS_L"] * p["CHUNK_L"]


def test_launch_plan_fills_the_gpu_at_batch_2():
    """SD's (2, 320, 64, 64): 64 (sample, group) pairs split to several programs per SM."""
    sms = 132  # H100 SXM
    p = launch_plan(2, 32, 10, 64 * 64, target_programs=4 * sms)
    assert 2 * 32 * p["CHUNKS_C"] * p["CHUNKS_L"] >= 3 * sms


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_groups=3), "num_groups=3"),
    (dict(num_groups=2, activation="gelu"), "activation"),
    (dict(num_groups=2, weight=torch.ones(5)), "weight"),
])
def test_bad_input_names_the_problem(kwargs, match):
    x = torch.randn(1, 8, 2, 2, device=DEVICE)
    if "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].to(DEVICE)
    with pytest.raises(ValueError, match=match):
        fused_group_norm(x, **kwargs)


def test_float64_is_rejected():
    with pytest.raises(TypeError, match="float64"):
        fused_group_norm(torch.randn(1, 4, 2, 2, dtype=torch.float64, device=DEVICE), 2)


# ----------------------------------------------------------------------------- GPU only
SD_SHAPES = {"down 64x64": (2, 320, 64, 64), "mid 32x32": (2, 640, 32, 32),
             "deep 16x16": (2, 1280, 16, 16), "decoder 960 at 32x32": (2, 960, 32, 32)}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", list(SD_SHAPES.values()), ids=list(SD_SHAPES))
def test_sd_shapes_on_gpu(shape, dtype, channels_last):
    x, w, b, dy = _inputs(shape, channels_last, True, dtype, device="cuda")
    got = _grads(lambda x, w, b: fused_group_norm(x, 32, w, b, activation="silu"), x, w, b, dy)
    ref = _grads(lambda x, w, b: group_norm_reference(x, 32, w, b, activation="silu"),
                 *_fp32(x, w, b, dy))
    own = _grads(_torch_in_dtype(32, "silu"), x, w, b, dy)
    for name, g, r, o in zip(("y", "dx", "dweight", "dbias"), got, ref, own):
        if dtype == torch.float32:  # dweight/dbias sum 8192+ terms: allow the summation order
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
        else:
            _assert_close(f"{shape} {name}", g, r, o, dtype)
