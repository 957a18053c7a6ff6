"""ldm.ops: every backend of attention and group_norm agrees with an independent reference.

Runs on CPU (the "triton" backend through the interpreter that conftest switches on) and,
where CUDA is present, also checks torch.compile through the Triton kernels with no graph break.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ldm import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
ATTN_BACKENDS = ["auto", "triton", "sdpa", "torch",
                 pytest.param("xformers", marks=pytest.mark.skipif(
                     not (HAS_XFORMERS and CUDA), reason="xformers (CUDA) not installed"))]
GN_BACKENDS = ["auto", "triton", "sdpa", "torch", "xformers"]


def _attention_fp64(q, k, v, mask, scale):
    """softmax(q k^T * scale) v in float64 straight from the definition."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, -1), v.double())


def _qkv(b=2, h=2, n_q=13, n_k=77, d=40, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(DEVICE).requires_grad_(requires_grad)
               for n in (n_q, n_k, n_k))
    mask = torch.rand(b, n_k, generator=g).to(DEVICE) > 0.3
    mask[:, 0] = True  # keep at least one key per row: an all-masked row is undefined here
    return q, k, v, mask


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding"])
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_backends_match_fp64_reference(backend, masked):
    q, k, v, mask = _qkv()
    mask = mask if masked else None
    scale = 0.7 / math.sqrt(q.shape[-1])
    out = ops.attention(q, k, v, key_padding_mask=mask, scale=scale, backend=backend)
    ref = _attention_fp64(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), atol=5e-5, rtol=5e-5,
                                   msg=lambda m: f"d{name}: {m}")


def _gn_inputs(shape=(2, 12, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(DEVICE).requires_grad_()
    w = torch.randn(shape[1], generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(shape[1], generator=g).to(DEVICE).requires_grad_()
    return x, w, b


def _group_norm_fp64(x, groups, w, b, eps, activation):
    """GroupNorm from its definition (Wu & He 2018, eq. 1) in float64, then SiLU."""
    n, c = x.shape[:2]
    xg = x.double().reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)  # biased, as in the paper
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = y * w.double().reshape(shape) + b.double().reshape(shape)
    return y * torch.sigmoid(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", [None, "silu"], ids=["plain", "silu"])
@pytest.mark.parametrize("backend", GN_BACKENDS)
def test_group_norm_backends_match_fp64_reference(backend, activation):
    x, w, b = _gn_inputs()
    y = ops.group_norm(x, 3, w, b, eps=1e-5, activation=activation, backend=backend)
    ref = _group_norm_fp64(x, 3, w, b, 1e-5, activation)
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    ref_grads = torch.autograd.grad(ref, (x, w, b), dy.double())
    for name, g, r in zip(("x", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), atol=5e-5, rtol=5e-5,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.skipif(HAS_XFORMERS, reason="xformers is installed")
def test_xformers_missing_says_how_to_install():
    q, k, v, _ = _qkv(requires_grad=False)
    with pytest.raises(ImportError, match=r"pip install \.\[gpu\]"):
        ops.attention(q, k, v, backend="xformers")


@pytest.mark.parametrize("call", [
    lambda q, x: ops.attention(q, q, q, backend="flash"),
    lambda q, x: ops.group_norm(x, 3, backend="cudnn"),
], ids=["attention", "group_norm"])
def test_bad_backend_name_raises(call):
    q, _, _, _ = _qkv(requires_grad=False)
    x, _, _ = _gn_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        call(q, x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_groups=3, activation="gelu"), "activation"),
    (dict(num_groups=5), "num_groups=5"),
    (dict(num_groups=3, weight=torch.ones(4)), r"weight must have shape \(12,\)"),
])
def test_bad_group_norm_arguments_raise(kwargs, match):
    x, _, _ = _gn_inputs()
    with pytest.raises(ValueError, match=match):
        ops.group_norm(x, **kwargs)


@pytest.mark.parametrize("args,match", [
    (lambda q, k, v, m: (q[0], k, v, None), r"q must be \(B, H, N, d\)"),
    (lambda q, k, v, m: (q, k[..., :8], v, None), "do not match|must be"),
    (lambda q, k, v, m: (q, k, v, m.float()), "key_padding_mask must be bool"),
    (lambda q, k, v, m: (q, k, v.double(), None), "dtype"),
], ids=["rank", "head-dim", "mask-dtype", "mixed-dtype"])
def test_bad_attention_inputs_raise(args, match):
    q, k, v, mask = _qkv(requires_grad=False)
    q, k, v, mask = args(q, k, v, mask)
    with pytest.raises(ValueError, match=match):
        ops.attention(q, k, v, key_padding_mask=mask)


@pytest.mark.skipif(CUDA, reason="the error is about CPU tensors without the interpreter")
def test_triton_on_cpu_without_interpreter_explains():
    code = ("import torch\nfrom ldm import ops\n"
            "ops.group_norm(torch.randn(1, 4, 2, 2), 2, backend='triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]


class _NormThenSelfAttention(torch.nn.Module):
    """A tiny U-Net-like block: GroupNorm+SiLU, then single-head self-attention over pixels."""

    def __init__(self, channels=32, groups=8, heads=2):
        super().__init__()
        self.groups, self.heads = groups, heads
        self.weight = torch.nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(channels) * 0.1)
        self.qkv = torch.nn.Linear(channels, 3 * channels)

    def forward(self, x, backend="auto"):
        b, c, h, w = x.shape
        x = ops.group_norm(x, self.groups, self.weight, self.bias, activation="silu",
                           backend=backend)
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = ops.attention(q, k, v, backend=backend)  # (B, H, HW, d)
        return out.transpose(1, 2).reshape(b, h * w, c)


def _compile_and_compare(module, x, backend_compile):
    eager = module(x)
    compiled = torch.compile(module, fullgraph=True, backend=backend_compile)  # no graph breaks
    out = compiled(x)
    torch.testing.assert_close(out, eager, atol=2e-4, rtol=2e-4)
    out.square().mean().backward()
    assert module.qkv.weight.grad is not None and torch.isfinite(module.weight.grad).all()


@pytest.mark.parametrize("compiler", [
    "aot_eager",  # Dynamo + AOTAutograd: what can break the graph; seconds on 2 cores
    pytest.param("inductor", marks=pytest.mark.slow),  # adds C++ codegen: ~1.5 min on 2 cores
])
def test_torch_compile_fallback_path_on_cpu(compiler):
    torch._dynamo.reset()
    module = _NormThenSelfAttention()
    x = torch.randn(2, 32, 4, 4)
    _compile_and_compare(module, x, compiler)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_torch_compile_triton_path_has_no_graph_break():
    torch._dynamo.reset()
    module = _NormThenSelfAttention(channels=64, groups=8, heads=2).cuda()
    x = torch.randn(2, 64, 8, 8, device="cuda")
    explanation = torch._dynamo.explain(module)(x, "triton")
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    _compile_and_compare(module, x, "inductor")


def test_benchmark_runs_tiny_config(tmp_path):
    """`python -m ldm.kernels.bench` runs end to end and writes its JSON (no timing checks)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "ldm.kernels.bench", "--quick", "--max-cases", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"device", "torch", "triton", "date", "command", "copy_gbps"} <= report.keys()
    ops_seen = {r["op"] for r in report["results"]}
    assert ops_seen == {"attention", "group_norm"}
    assert all(r.get("ms") is not None or "error" in r for r in report["results"])
    if CUDA:  # our kernels are timed, with a speedup against each peer that ran
        assert any("speedup_vs" in r for r in report["results"] if r["impl"] == "ours")
        assert any(r.get("graph_ms") for r in report["results"] if r["impl"] == "ours")


def test_benchmark_ratios_per_timing():
    """Speed-ups are peer time / our time, separately for Python calls and CUDA-graph replays,
    and a peer that failed (no time) gets no ratio."""
    from ldm.kernels.bench import add_ratios

    key = dict(op="attention", case="c", dtype="fp16", direction="fwd")
    rows = add_ratios([dict(key, impl="ours", ms=2.0, graph_ms=0.5),
                       dict(key, impl="sdpa-flash", ms=1.0, graph_ms=1.0),
                       dict(key, impl="sdpa-cudnn", ms=None, error="RuntimeError: no"),
                       dict(key, impl="xformers", ms=4.0, graph_ms=None),
                       dict(key, direction="fwd+bwd", impl="sdpa-flash", ms=3.0)])
    assert rows[0]["speedup_vs"] == {"sdpa-flash": 0.5, "xformers": 2.0}
    assert rows[0]["graph_speedup_vs"] == {"sdpa-flash": 2.0}
    assert "speedup_vs" not in rows[4]
