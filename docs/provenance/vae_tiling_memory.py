"""Peak memory and time of an SD-sized decode, untiled vs exact tiles (ldm.models.vae_tiling), on a CPU.

    python docs/provenance/vae_tiling_memory.py --size 1024 --tiles 512,256

Each decode runs in a fresh subprocess that builds the SD 1.x/2.x/SDXL autoencoder shape (base 128 channels,
mults 1,2,4,4, 2 ResBlocks, 32 groups, mid attention; random weights, seed 0), decodes one random latent
(1, 4, size/8, size/8) in fp32 and reports its peak RSS (resource.getrusage ru_maxrss) before and after the
decode, and the decode's wall time. The parent prints one line per run and the largest difference of each
tiled image from the untiled one. On a CPU the store is the CPU itself: the saving is the untiled network's
temporaries (normalised copies, conv outputs next to their inputs), not the full activations.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(size: int, tile: int, out: str) -> None:
    import torch

    from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                                         num_groups=32, z_channels=4)).eval()
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024           # MiB (Linux: KiB)
    start = time.perf_counter()
    with torch.no_grad():
        image = ae.decode(z, tile=tile or None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(image, out)
    print(json.dumps(dict(tile=tile, before_mib=before, peak_mib=peak, seconds=seconds,
                          threads=torch.get_num_threads())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--tiles", default="512,256", help="tile sides to compare with untiled (default 512,256)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.size, args.child, args.out)
        return
    import torch
    results, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for tile in [0] + [int(t) for t in args.tiles.split(",")]:
            out = os.path.join(tmp, f"{tile}.pt")
            run = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", str(tile),
                                  "--out", out], capture_output=True, text=True, check=True)
            result = json.loads(run.stdout.strip().splitlines()[-1])
            images[tile] = torch.load(out)
            result["max_abs_diff"] = (images[tile] - images[0]).abs().max().item()
            results.append(result)
            print(f"{args.size}x{args.size} {'untiled' if not tile else f'tile {tile} px':>12}: peak RSS "
                  f"{result['peak_mib']:7.0f} MiB (before decode {result['before_mib']:5.0f}), "
                  f"{result['seconds']:6.1f} s, {result['threads']} threads, max |diff| vs untiled "
                  f"{result['max_abs_diff']:.2e}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
