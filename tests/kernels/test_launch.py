"""The direct launch path (ldm.kernels.launch._Direct) hands the driver exactly what Triton's
own JITFunction.run does, and goes back to Triton whenever a specialization could differ.

No GPU needed: a subprocess compiles for a pretend sm_90 and records each driver launch call
instead of making it (as `python -m ldm.kernels.hostbench` does, which also times it).
"""
import json
import os
import subprocess
import sys

_RECORD = r"""
import json, torch
from triton.compiler.compiler import CompiledKernel
from triton.runtime.jit import JITFunction
from ldm.kernels import hostbench
hostbench._pretend_sm90()
from ldm.kernels import attention as A, group_norm as G, launch
hostbench._patch_for_cpu(A, G)

calls, triton_runs, names = [], [0], {}
def describe(v):
    if isinstance(v, torch.Tensor):
        return ["tensor", names.get(v.data_ptr(), "new"), str(v.dtype), list(v.shape), list(v.stride())]
    return v if isinstance(v, (int, float, bool, str, type(None))) else type(v).__name__
def record(self):
    self._run = lambda *a: calls.append([self.name] + [describe(v) for v in a[:4] + a[9:]])
    self.module = self.function = 0
CompiledKernel._init_handles = record
official = JITFunction.run
def counted(self, *a, **kw):
    triton_runs[0] += 1
    return official(self, *a, **kw)
JITFunction.run = counted

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 3, n, 40, generator=g, dtype=torch.float16) for n in (65, 77, 77))
mask = torch.rand(2, 77, generator=g) > 0.3
x = torch.randn(2, 64, 6, 5, generator=g, dtype=torch.bfloat16)
w, b = (torch.rand(64, generator=g, dtype=torch.bfloat16) for _ in range(2))
for name, t in dict(q=q, k=k, v=v, x=x, w=w, b=b).items():
    names[t.data_ptr()] = name
for t in (q, k, v, x, w, b):
    t.requires_grad_()

def step():  # forward and backward of both ops: 1 + 3 attention and 2 + 2 GroupNorm launches
    out = A.flash_attention(q, k, v, key_padding_mask=mask)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    y = G.fused_group_norm(x, 8, w, b, activation="silu")
    torch.autograd.grad(y, (x, w, b), torch.ones_like(y))

report = {}
for label in ("first", "again"):
    calls.clear(); triton_runs[0] = 0
    step()
    report[label] = dict(calls=list(calls), triton_runs=triton_runs[0])
# An input whose alignment differs (a view starting 1 element in): Triton must specialize anew.
calls.clear(); triton_runs[0] = 0
with torch.no_grad():
    base = torch.randn(2 * 3 * 65 * 40 + 1, dtype=torch.float16)
    A.flash_attention(base[1:].view(2, 3, 65, 40), k, v, key_padding_mask=mask)  # else as in step()
report["misaligned"] = dict(calls=list(calls), triton_runs=triton_runs[0])
report["direct"] = sorted(k.__name__ for k, d in launch._DIRECT.items() if isinstance(d, launch._Direct))
print(json.dumps(report))
"""


def _run_record(extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    done = subprocess.run([sys.executable, "-c", _RECORD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_direct_launch_passes_what_triton_passes():
    report = _run_record()
    first, again = report["first"], report["again"]
    assert len(first["calls"]) == 8 and first["triton_runs"] == 8  # every launch went through Triton
    assert again["triton_runs"] == 0  # ... and the second time none did
    assert again["calls"] == first["calls"]  # same kernels, grids, argument values and layouts
    assert report["direct"] == sorted(
        ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
         "_gn_stats_kernel", "_gn_forward_kernel", "_gn_backward_partials_kernel", "_gn_backward_dx_kernel"])
    # The inputs reach the kernels in their places (named by data pointer), both times.
    fwd = next(c for c in again["calls"] if c[0] == "_attn_fwd_kernel")
    assert [a[1] for a in fwd[5:8]] == ["q", "k", "v"]


def test_a_new_specialization_goes_back_to_triton():
    report = _run_record()
    assert report["misaligned"]["triton_runs"] == 1, report["misaligned"]


def test_direct_launch_can_be_switched_off():
    report = _run_record({"LDM_DIRECT_LAUNCH": "0"})
    assert report["direct"] == [] and report["again"]["triton_runs"] == 8
