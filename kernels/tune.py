"""Sweep the attention kernels' tile configs on a GPU: which (BLOCK_M, BLOCK_N, warps, stages)
is fastest per SD shape. The launchers use fixed tables (_block_config, _bwd_block_config);
this measures the candidates so those tables can be set from data.

    python -m ldm.kernels.tune [--out FILE.json] [--time-limit S] [--passes fwd,bwd]

Each candidate runs through the real launcher (the table function is swapped for one call),
is checked against the default config's output, and is timed as a CUDA-graph replay (device
time, L2 flushed before each replay), median of 30. Candidates that do not compile or fit in
shared memory are recorded with their error. JSON is rewritten after every case, so a run cut
by --time-limit keeps what it measured. GPU only.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time

import torch

from ldm.kernels import attention as attn
from ldm.kernels.bench import TEXT_TOKENS, describe_error, graph_timer, make_timer
from ldm.kernels.launch import next_pow2

# (label, B, H, Nq, Nk, d): the SD-1.5 levels, batch 2 (CFG), 8 heads, as in the benchmark.
CASES = [("self N=4096 d=40", 2, 8, 4096, 4096, 40), ("self N=1024 d=80", 2, 8, 1024, 1024, 80),
         ("self N=256 d=160", 2, 8, 256, 256, 160), ("cross N=4096 d=40", 2, 8, 4096, TEXT_TOKENS, 40),
         ("self N=4096 d=64", 2, 8, 4096, 4096, 64)]
FWD = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
       for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
BWD = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
       for m, n, w, s in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2))
       if m * n <= 64 * 128]


def _run(pass_name, cfg, tensors, scale):
    """One launcher call with the config table replaced by cfg (None: the default table)."""
    q, k, v, out, lse, do = tensors
    table = "_block_config" if pass_name == "fwd" else "_bwd_block_config"
    saved = getattr(attn, table)
    if cfg is not None:
        setattr(attn, table, lambda *a, **kw: dict(cfg))
    try:
        if pass_name == "fwd":
            return attn._attn_fwd(q, k, v, None, scale, "ieee")
        return attn._attn_bwd(do, q, k, v, out, lse, None, scale, "ieee")
    finally:
        setattr(attn, table, saved)


def sweep_case(case, dtype, pass_name, timer, deadline):
    label, b, h, n_q, n_k, d = case
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(b, h, n_k, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    do = torch.randn_like(q)
    scale = d ** -0.5
    out, lse = attn._attn_fwd(q, k, v, None, scale, "ieee")
    tensors = (q, k, v, out, lse, do)
    reference = _run(pass_name, None, tensors, scale)
    default = (attn._block_config if pass_name == "fwd" else attn._bwd_block_config)(
        max(16, next_pow2(d)), dtype, q.device)
    rows = []
    for cfg in sorted(FWD if pass_name == "fwd" else BWD, key=lambda c: c != default):
        if time.monotonic() > deadline:
            break
        row = dict(case=label, shape=[b, h, n_q, n_k, d], dtype=str(dtype).split(".")[-1],
                   pass_=pass_name, **cfg, default=cfg == default)
        try:
            got = _run(pass_name, cfg, tensors, scale)
            err = max((a.float() - r.float()).abs().max().item() for a, r in zip(got, reference))
            row.update(max_abs_diff_vs_default=err,
                       ms=timer(lambda cfg=cfg: _run(pass_name, cfg, tensors, scale)))
        except Exception as e:  # out of shared memory, no valid layout, ...
            row.update(ms=None, error=describe_error(e))
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--time-limit", type=float, default=300.0, help="stop after this many seconds")
    parser.add_argument("--passes", default="fwd,bwd", help="comma-separated subset of fwd,bwd")
    parser.add_argument("--dtypes", default="fp16", help="comma-separated subset of fp16,bf16")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the sweep needs a CUDA GPU (the interpreter says nothing about tile speed)")
    deadline = time.monotonic() + args.time_limit
    timer = graph_timer(make_timer(torch.device("cuda"), 5, 30))
    import triton

    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, command=" ".join(["python", "-m", "ldm.kernels.tune", *argv]),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  complete=False, best={}, results=[])
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    for case, dname, pass_name in itertools.product(CASES, args.dtypes.split(","),
                                                     args.passes.split(",")):
        rows = sweep_case(case, dtypes[dname], pass_name, timer, deadline)
        report["results"] += rows
        timed = [r for r in rows if r.get("ms")]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            base = next((r["ms"] for r in timed if r["default"]), None)
            report["best"][f"{pass_name} {dname} {case[0]}"] = dict(
                best, speedup_vs_default=base / best["ms"] if base else None)
            print(f"{pass_name} {dname} {case[0]}: best {best['ms']:.4f} ms "
                  f"M={best['BLOCK_M']} N={best['BLOCK_N']} w={best['num_warps']} "
                  f"s={best['num_stages']}; default {base and round(base, 4)} ms", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    report["complete"] = time.monotonic() <= deadline
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
