"""Benchmark our Triton attention and GroupNorm(+SiLU) against PyTorch's and xformers' kernels.

    python -m ldm.kernels.bench [--out FILE.json] [--quick]

For every op / shape / dtype / direction (fwd, fwd+bwd) it times our kernel and each peer
(SDPA with each backend it offers, xformers when installed, eager F.group_norm + F.silu and
torch.compile of it), prints a table and writes JSON with the device, versions, date and
command. Timings: CUDA events around each call, L2 flushed between calls, median of repeats;
on a GPU each callable is timed twice: as called from Python (`ms`: what an eager U-Net pays,
launch and host time included) and replayed from a CUDA graph (`graph_ms`: the device time
alone, as under CUDA graphs or torch.compile's reduce-overhead), each with its own speed-ups.
Throughput: attention TFLOP/s = 4*B*H*Nq*Nk*d forward, 2.5x that backward; GroupNorm GB/s
counts the bytes an ideal kernel must move (fwd: read x, write y; bwd: read x, dy, write dx),
so every implementation is scored on the same byte count and against the copy bandwidth.
On CPU only a tiny --quick subset of PyTorch peers runs: it checks the harness, not speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# SD-1.5 U-Net at 512x512 (64x64 latents): tokens and head dim per level, 8 heads, batch 2 (CFG).
ATTN_LEVELS = [(4096, 40), (1024, 80), (256, 160), (64, 160)]
# head_dim 64 (SD-2/SDXL-style heads), where FlashAttention needs no padding: issue #3's 0.9x goal.
ATTN_EXTRA = [(4096, 64)]
TEXT_TOKENS = 77
# (channels, side): encoder 320/640/1280 and decoder concatenations 960/1920/2560.
GN_SHAPES = [(320, 64), (640, 32), (1280, 16), (1280, 8), (960, 64), (640, 64), (960, 32),
             (1280, 32), (1920, 32), (1920, 16), (2560, 16), (2560, 8)]


# ----------------------------------------------------------------------------- timing
def make_timer(device: torch.device, warmup: int, reps: int):
    """A function that returns the median milliseconds of fn() on this device."""
    if device.type != "cuda":
        def time_cpu(fn):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        return time_cpu

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # > L2 of H100/H200

    def time_cuda(fn):
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            flush.zero_()  # a cold L2, as inside a U-Net where other layers evict it
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    return time_cuda


def graph_timer(timer):
    """Time fn captured in a CUDA graph: one replay per call, so host/launch time drops out."""
    def time_graph(fn):
        side = torch.cuda.Stream()  # capture wants its warm-up (allocator, autotune) off-stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timer(graph.replay)
    return time_graph


def copy_bandwidth_gbps(device: torch.device, timer, megabytes: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second)."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _fwd_bwd(fn, inputs, grad):
    """A callable running fn(*inputs) and its backward w.r.t. inputs."""
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad)
    return run


# ----------------------------------------------------------------------------- peers
def _sdpa_peers():
    """name -> attention fn (q, k, v) for each SDPA backend, plus xformers when installed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    peers = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue

        def fn(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        peers[f"sdpa-{name.split('_')[0].lower()}"] = fn
    try:
        import xformers.ops as xops

        peers["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    except ImportError:
        pass
    return peers


def _gn_eager(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-5))


# ----------------------------------------------------------------------------- cases
def attention_cases(quick: bool, device: torch.device):
    """(label, B, H, Nq, Nk, d) for SD self- and cross-attention."""
    if quick and device.type != "cuda":
        return [("self tiny", 1, 2, 64, 64, 40), ("cross tiny", 1, 2, 64, TEXT_TOKENS, 40)]
    levels = ATTN_LEVELS[:2] if quick else ATTN_LEVELS + ATTN_EXTRA
    cases = []
    for n, d in levels:
        cases.append((f"self N={n} d={d}", 2, 8, n, n, d))
        cases.append((f"cross N={n} d={d}", 2, 8, n, TEXT_TOKENS, d))
    return cases


def group_norm_cases(quick: bool, device: torch.device):
    """(label, shape, channels_last) for SD GroupNorm(+SiLU), 32 groups, batch 2."""
    if quick and device.type != "cuda":
        return [("C=64 8x8", (1, 64, 8, 8), False)]
    shapes = GN_SHAPES[:3] if quick else GN_SHAPES
    cases = []
    for i, (c, s) in enumerate(shapes):  # NHWC next to its NCHW twin, so --max-cases keeps both
        cases.append((f"C={c} {s}x{s}", (2, c, s, s), False))
        if i < 3:
            cases.append((f"C={c} {s}x{s} NHWC", (2, c, s, s), True))
    return cases


def bench_attention(case, dtype, device, timer, use_ours: bool, peers: dict):
    label, b, h, n_q, n_k, d = case
    q = torch.randn(b, h, n_q, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, h, n_k, d, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    grad = torch.randn_like(q)
    impls = dict(peers)
    if use_ours:
        from ldm.kernels.attention import flash_attention
        impls = {"ours": lambda q, k, v: flash_attention(q, k, v), **impls}
    flops = 4.0 * b * h * n_q * n_k * d
    rows = []
    for direction, work in (("fwd", flops), ("fwd+bwd", 3.5 * flops)):
        for name, fn in impls.items():
            run = ((lambda fn=fn: fn(q, k, v)) if direction == "fwd"
                   else _fwd_bwd(fn, (q, k, v), grad))
            row = dict(op="attention", case=label, shape=[b, h, n_q, n_k, d],
                       direction=direction, impl=name)

            def rate(ms, work=work):
                return dict(tflops=work / (ms * 1e-3) / 1e12)
            # SDPA's math backend is never the best peer: no graph replay for it (saves GPU time)
            rows.append(_measure(row, run, timer, rate, graph=name != "sdpa-math"))
    return rows


def bench_group_norm(case, dtype, device, timer, use_ours: bool, copy_gbps):
    label, shape, channels_last = case
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(shape[1], device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    impls = {"eager": _gn_eager}
    if device.type == "cuda":
        # A fresh static-shape compile per case: Dynamo's per-function recompile limit would
        # otherwise silently fall back to eager after a few shapes.
        torch._dynamo.reset()
        impls["compile"] = torch.compile(_gn_eager, dynamic=False)
    if use_ours:
        from ldm.kernels.group_norm import fused_group_norm
        impls = {"ours": lambda x, w, b: fused_group_norm(x, 32, w, b, activation="silu"), **impls}
    elem = x.numel() * x.element_size()
    rows = []
    for direction, nbytes in (("fwd", 2 * elem), ("fwd+bwd", 5 * elem)):
        for name, fn in impls.items():
            run = ((lambda fn=fn: fn(x, w, b)) if direction == "fwd"
                   else _fwd_bwd(fn, (x, w, b), grad))
            row = dict(op="group_norm", case=label, shape=list(shape), direction=direction,
                       impl=name, layout="nhwc" if channels_last else "nchw")

            def rate(ms, nbytes=nbytes):
                gbps = nbytes / (ms * 1e-3) / 1e9
                out = dict(gbps=gbps)
                if copy_gbps:
                    out["pct_copy_bw"] = 100.0 * gbps / copy_gbps
                return out
            rows.append(_measure(row, run, timer, rate))
    return rows


def _measure(row, run, timer, rate, graph=True):
    try:
        ms = timer(run)
        row.update(ms=ms, **rate(ms))
    except Exception as err:  # a peer that rejects this shape/dtype: record why, keep going
        row.update(ms=None, error=describe_error(err))
    graphed = getattr(timer, "graph", None) if graph else None
    if graphed is not None and row["ms"] is not None:
        try:
            row["graph_ms"] = graphed(run)
            row.update({f"graph_{k}": v for k, v in rate(row["graph_ms"]).items()})  # graph_tflops, ...
        except Exception as err:  # not capturable (e.g. a host sync inside): say so
            row.update(graph_ms=None, graph_error=describe_error(err))
    return row


def describe_error(err: Exception) -> str:
    """The exception's type and first line (160 characters at most), for a JSON row."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def add_ratios(rows):
    """speedup_vs[peer] = peer_ms / ours_ms on each 'ours' row (> 1: ours is faster), and
    graph_speedup_vs the same from CUDA-graph replays."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["dtype"], r["direction"]), []).append(r)
    for group in groups.values():
        ours = next((r for r in group if r["impl"] == "ours"), None)
        for key, out in (("ms", "speedup_vs"), ("graph_ms", "graph_speedup_vs")):
            if ours is not None and ours.get(key):
                ours[out] = {r["impl"]: r[key] / ours[key]
                             for r in group if r is not ours and r.get(key)}
    return rows


def print_table(rows):
    print(f"{'op':<10} {'case':<24} {'dtype':<5} {'dir':<8} {'impl':<14} {'ms':>9} "
          f"{'graph ms':>9} {'rate':>14}  speedup of ours (graph)")
    for r in rows:
        ms = f"{r['ms']:.4f}" if r.get("ms") else "-"
        gms = f"{r['graph_ms']:.4f}" if r.get("graph_ms") else "-"
        rate = (f"{r['tflops']:.3g} TFLOP/s" if "tflops" in r else
                f"{r['gbps']:.4g} GB/s" if "gbps" in r else r.get("error", "")[:30])
        graph = r.get("graph_speedup_vs", {})
        vs = " ".join(f"{k}:{v:.2f}x" + (f" ({graph[k]:.2f}x)" if k in graph else "")
                      for k, v in r.get("speedup_vs", {}).items())
        print(f"{r['op']:<10} {r['case']:<24} {r['dtype']:<5} {r['direction']:<8} "
              f"{r['impl']:<14} {ms:>9} {gms:>9} {rate:>14}  {vs}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="a few shapes (CPU: a tiny subset)")
    parser.add_argument("--ops", default="attention,group_norm", help="comma-separated ops")
    parser.add_argument("--max-cases", type=int, default=None,
                        help="keep the first N shapes per op")
    parser.add_argument("--timing", default="both", choices=["both", "events"],
                        help="GPU: also time CUDA-graph replays (both), or only Python calls")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    ops = args.ops.split(",")
    unknown = set(ops) - {"attention", "group_norm"}
    if unknown:
        parser.error(f"unknown --ops {sorted(unknown)}; choose from attention, group_norm")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # shared CI cores: one thread keeps the harness check steady
        print("NOTE: no CUDA device. Timing PyTorch peers only on CPU; these numbers are "
              "meaningless for the GPU goals (our kernels are not timed in the interpreter).")
    warmup, reps = (10, 50) if cuda and not args.quick else (3, 10) if cuda else (1, 3)
    timer = make_timer(device, warmup, reps)
    if cuda and args.timing == "both":
        timer.graph = graph_timer(timer)
    copy_gbps = copy_bandwidth_gbps(device, timer, 1024 if cuda else 16)
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s")
    dtypes = DTYPES if cuda else {"fp32": torch.float32}

    import triton  # versions only; on CPU the kernels are never launched here

    report = dict(
        device=torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", "-m", "ldm.kernels.bench", *argv]),
        quick=args.quick, timing=args.timing if cuda else "cpu", warmup=warmup, reps=reps, copy_gbps=copy_gbps,
        note=None if cuda else "CPU timings: harness check only, meaningless for GPU goals",
        complete=False, results=[])

    def save(rows, complete):
        """Rewrite the JSON after every case: an interrupted run keeps what it measured."""
        if not complete:
            print(f"  {rows[-1]['op']} {rows[-1]['case']} {rows[-1]['dtype']}: done", flush=True)
        report.update(results=add_ratios(rows), complete=complete)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    rows = []
    for dname, dtype in dtypes.items():
        if "attention" in ops:
            peers = _sdpa_peers() if cuda else {"sdpa": F.scaled_dot_product_attention}
            for case in attention_cases(args.quick, device)[:args.max_cases]:
                rows += [dict(r, dtype=dname)
                         for r in bench_attention(case, dtype, device, timer, cuda, peers)]
                save(rows, complete=False)
        if "group_norm" in ops:
            for case in group_norm_cases(args.quick, device)[:args.max_cases]:
                rows += [dict(r, dtype=dname)
                         for r in bench_group_norm(case, dtype, device, timer, cuda, copy_gbps)]
                save(rows, complete=False)
    save(rows, complete=True)
    print_table(rows)
    if args.out:
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
