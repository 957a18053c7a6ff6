"""The attribute oracle: a small CNN paints class maps, reader.py turns them into judgements.

`Oracle.load()` gives the shipped weights (ldm/eval/oracle.safetensors, measured
accuracy in oracle.json). Images are (B, 3, H, W) uint8 or float in [-1, 1] at any
resolution; they are resized to 64x64, where the net predicts per pixel a colour class
(background + 6) and a shape class (3), fully convolutionally.

CLI:
  python -m ldm.eval.oracle train --out ldm/eval/oracle.safetensors [--steps N] [--batch B]
  python -m ldm.eval.oracle evaluate [--n 2000] [--degrade] [--weights PATH]

Training streams the shapes world's train split, half of each batch degraded by blur and
noise (see `degrade`); evaluation uses the held-out split only. The shipped weights took
2500 steps of 32 (about 0.3 s a step on one free CPU core); on a busy machine
OMP_NUM_THREADS=1 is much faster than two threads fighting for cores.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ldm.data.captions import COLOUR_NAMES, SHAPE_NAMES, parse_caption
from ldm.data.shapes import generate, render
from ldm.eval.metrics import probes
from ldm.eval.reader import SIDE, Reading, attribute, judge, read_maps, scene_maps
from ldm.models.weights import write_safetensors

WEIGHTS = Path(__file__).with_name("oracle.safetensors")
N_COLOUR, N_SHAPE = 1 + len(COLOUR_NAMES), len(SHAPE_NAMES)
BLUR_SIGMA = (0.5, 1.0)    # px at 64x64: the mild blur the oracle must shrug off
NOISE_STD = (0.03, 0.05)   # in [0, 1] pixel units
CHUNK = 256                # images per forward pass at inference


# ------------------------------------------------------------------------- network

def conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 conv + BatchNorm + SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation, bias=False),
                         nn.BatchNorm2d(c_out), nn.SiLU())


class MapNet(nn.Module):
    """A small U-Net run at 32x32 and 16x16 (dilated: one cell sees a whole large object).

    The 64x64 input is folded losslessly into 32x32 (pixel unshuffle) and the logits are
    unfolded back (pixel shuffle, the sub-pixel conv of Shi et al. 2016): full-resolution
    maps at a quarter of the full-resolution cost, so it trains on two CPU cores.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        w1, w2 = width, 2 * width
        self.enc1 = nn.Sequential(conv(12, w1), conv(w1, w1))
        self.enc2 = nn.Sequential(conv(w1, w2, stride=2), conv(w2, w2),
                                  conv(w2, w2, dilation=2), conv(w2, w2, dilation=4))
        self.dec1 = conv(w2 + w1, w1)
        self.head = nn.Conv2d(w1, 4 * (N_COLOUR + N_SHAPE), 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f1 = self.enc1(F.pixel_unshuffle(x, 2))  # (B, w1, 32, 32)
        f2 = self.enc2(f1)                        # (B, w2, 16, 16)
        return f1, f2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 7 + 3, 64, 64): colour classes, then shape classes."""
        f1, f2 = self.encode(x)
        up = F.interpolate(f2, scale_factor=2, mode="nearest")
        d1 = self.dec1(torch.cat([up, f1], dim=1))    # (B, w1, 32, 32)
        return F.pixel_shuffle(self.head(d1), 2)      # (B, 10, 64, 64)


# ---------------------------------------------------------------------- degradations

def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image; x (B, C, H, W), sigma (B,)."""
    b, c, h, w = x.shape
    radius = 3
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))  # (B, 7)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 7)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)  # along H
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)  # along W
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.0) -> torch.Tensor:
    """Mild blur (sigma 0.5-1 px), Gaussian noise (std 0.03-0.05), optional jitter; x in [0, 1]."""
    b = x.shape[0]
    sigma, std = (lo + (hi - lo) * torch.rand(b, generator=generator)
                  for lo, hi in (BLUR_SIGMA, NOISE_STD))
    x = _blur(x, sigma)
    x = x + std[:, None, None, None] * torch.randn(x.shape, generator=generator)
    if jitter:  # per-channel gain: generated images rarely hit the palette exactly
        x = x * (1 + jitter * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1))
    return x.clamp(0, 1)


# ------------------------------------------------------------------------ the oracle

def check_images(images) -> None:
    """Raise a ValueError naming the shape unless `images` is a (B, 3, H, W) tensor."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 or float in [-1, 1] -> float in [0, 1] at 64x64."""
    check_images(images)
    x = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2
    if x.shape[-2:] != (SIDE, SIDE):
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True)
    return x.clamp(0, 1)


class Oracle:
    """Judges whether images show what shapes-world captions ask for."""

    def __init__(self, net: MapNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Oracle":
        path = Path(path) if path is not None else WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"oracle weights not found at {path}; train them with "
                                    f"python -m ldm.eval.oracle train --out {path}")
        net = MapNet()
        net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return cls(net)

    @torch.no_grad()
    def maps(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Colour and shape class maps (B, 64, 64) and the 64x64 uint8 images (B, 64, 64, 3)."""
        x = to_unit(images)
        logits = torch.cat([self.net(2 * c - 1) for c in x.split(CHUNK)])
        colour, shape = logits[:, :N_COLOUR].argmax(1), logits[:, N_COLOUR:].argmax(1)
        rgb = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return colour.numpy(), shape.numpy(), rgb.numpy()

    def read(self, images: torch.Tensor) -> list[Reading]:
        """The objects and background the oracle sees in each image."""
        colour, shape, rgb = self.maps(images)
        return read_maps(rgb, colour, shape)

    def judge_batch(self, images: torch.Tensor, captions: list[str]) -> list[dict[str, bool]]:
        """Per image, attribute key -> holds, for the attributes its caption asks for."""
        check_images(images)
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        asks = [parse_caption(c) for c in captions]
        return [judge(r, a) for r, a in zip(self.read(images), asks)]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 128) pooled bottleneck features (mean and max over 16x16) for Frechet distance."""
        x = 2 * to_unit(images) - 1
        feats = [self.net.encode(c)[1] for c in x.split(CHUNK)]
        return torch.cat([torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1) for f in feats])


# ------------------------------------------------------------------------- training

def make_batch(seed: int, start: int, n: int, split: str = "train"):
    """n samples from index `start`: images float (n, 3, 64, 64) in [0, 1], maps, scenes."""
    scenes = [generate(seed, i, split).scene for i in range(start, start + n)]
    images = np.stack([render(s, SIDE) for s in scenes])  # (n, 64, 64, 3) uint8
    maps = [scene_maps(s) for s in scenes]
    colour = torch.from_numpy(np.stack([m[0] for m in maps]))
    shape = torch.from_numpy(np.stack([m[1] for m in maps]))
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, colour, shape, scenes


def train(out: Path, steps: int = 2500, batch: int = 32, lr: float = 3e-3, seed: int = 0,
          n_eval: int = 1000) -> dict:
    """Train MapNet on the streamed train split, save weights and measured accuracy."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = MapNet().train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    # cosine decay to 2% after a short warm-up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 100) * (
        0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    bar = tqdm(range(steps), desc="oracle")
    for step in bar:
        x, colour, shape, _ = make_batch(seed, step * batch, batch)
        half = batch // 2  # half clean, half degraded: exact on both
        x = torch.cat([x[:half], degrade(x[half:], gen, jitter=0.05)])
        logits = net(2 * x - 1)
        loss = (F.cross_entropy(logits[:, :N_COLOUR], colour) +
                F.cross_entropy(logits[:, N_COLOUR:], shape, ignore_index=-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    write_safetensors(state, out, metadata={"steps": str(steps), "batch": str(batch)})
    oracle = Oracle(net)
    report = {"steps": steps, "batch": batch, "params": sum(p.numel() for p in net.parameters()),
              "clean": evaluate(oracle, n_eval),
              "degraded": evaluate(oracle, n_eval, degraded=True)}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ------------------------------------------------------------------------ evaluation

def evaluate(oracle: Oracle, n: int = 2000, degraded: bool = False, seed: int = 0,
             batch: int = 200) -> dict:
    """Per-attribute accuracy on n held-out images: true captions (holds), altered (does not)."""
    gen = torch.Generator().manual_seed(1234)
    rng = np.random.default_rng(1234)
    hits: dict[str, dict[bool, list[bool]]] = {}
    for start in range(0, n, batch):
        x, _, _, scenes = make_batch(seed, start, min(batch, n - start), "heldout")
        if degraded:
            x = degrade(x, gen)
        readings = oracle.read((x * 255).round().to(torch.uint8))
        for reading, scene in zip(readings, scenes):
            for text, key, expected in probes(scene, rng):
                judged = judge(reading, parse_caption(text))
                hits.setdefault(attribute(key), {True: [], False: []})[expected].append(
                    judged[key] == expected)
                if expected and key == "colour_0":  # once per image: no extra objects seen
                    hits.setdefault("count", {True: [], False: []})[True].append(judged["count"])
    report = {}
    for name, by in sorted(hits.items()):
        row = {"holds": float(np.mean(by[True])), "n": len(by[True])}
        if by[False]:
            row["does_not_hold"] = float(np.mean(by[False]))
            row["mean"] = (row["holds"] + row["does_not_hold"]) / 2
        report[name] = row
    return report


def _print(report: dict, title: str) -> None:
    print(title)
    for name, row in report.items():
        cols = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items())
        print(f"  {name:<11}{cols}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.eval.oracle", description=
                                     "Train or evaluate the shapes-world attribute oracle.")
    commands = parser.add_subparsers(dest="command", required=True)
    tr = commands.add_parser("train", help="train on the streamed train split, then evaluate")
    tr.add_argument("--out", type=Path, default=WEIGHTS, help="weights file (.safetensors); "
                    "the accuracy report goes beside it as .json")
    tr.add_argument("--steps", type=int, default=2500, help="optimizer steps (default 2500)")
    tr.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    tr.add_argument("--n-eval", type=int, default=1000,
                    help="held-out images for the report (default 1000)")
    ev = commands.add_parser("evaluate", help="per-attribute accuracy on the held-out split")
    ev.add_argument("--weights", type=Path, default=None, help="default: the shipped weights")
    ev.add_argument("--n", type=int, default=2000, help="held-out images (default 2000)")
    ev.add_argument("--degrade", action="store_true", help="also report on blurred, noisy images")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.steps < 1 or args.batch < 2:
            parser.error(f"need --steps >= 1 and --batch >= 2, got {args.steps} and {args.batch}")
        t0 = time.time()
        report = train(args.out, args.steps, args.batch, n_eval=args.n_eval)
        _print(report["clean"], "held-out, clean")
        _print(report["degraded"], "held-out, degraded")
        print(f"saved {args.out} ({time.time() - t0:.0f} s)")
    else:
        if args.n < 1:
            parser.error(f"--n must be >= 1, got {args.n}")
        oracle = Oracle.load(args.weights)
        _print(evaluate(oracle, args.n), "held-out, clean")
        if args.degrade:
            _print(evaluate(oracle, args.n, degraded=True), "held-out, degraded")


if __name__ == "__main__":
    main()
