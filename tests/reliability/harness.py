"""Helpers of the reliability tests: stage modules, subprocesses to kill, event files, weight comparison.

conftest.py registers this file as the module `reliability_harness`; tests `import reliability_harness as h`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("fault_runner.py")
STAGES = {"ae": ROOT / "stages" / "train_ae.py", "latent": ROOT / "stages" / "train_latent.py",
          "distill": ROOT / "stages" / "distill.py"}
TINY = {name: ROOT / "configs" / name / "tiny.yaml" for name in STAGES}

_runner = None


def runner():
    """fault_runner.py as a module (its `keyed_noise` and `load_module`), imported once."""
    global _runner
    if _runner is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location("reliability_fault_runner", RUNNER)
        _runner = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = _runner
        spec.loader.exec_module(_runner)
    return _runner


_stages: dict = {}


def stage(name: str):
    """stages/<name>.py imported once per session (stages/ is not a package)."""
    if name not in _stages:
        _stages[name] = runner().load_module(STAGES[name], f"reliability_stage_{name}")
    return _stages[name]


def env() -> dict:
    """Subprocess environment: one thread per process (2 shared cores), no CUDA."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_and_kill(hook: list[str], marker: Path, script: str, args: list[str], timeout: float = 240) -> str:
    """Start the runner with a fault `hook`, SIGKILL it once it wrote `marker`; returns its output."""
    cmd = [sys.executable, str(RUNNER), *hook, "--marker", str(marker), str(STAGES[script]), *args]
    log = marker.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before the kill point:\n"
                                     + log.read_text()[-4000:])
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("kill point not reached in time:\n" + log.read_text()[-4000:])
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    return log.read_text()


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every tensorboard event file under `logdir`.

    A resumed run logs the steps after its checkpoint again (in a new file); a step logged twice
    must carry the same value both times.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    merged: dict[str, dict[int, float]] = {}
    files = sorted(Path(logdir).rglob("events.out.tfevents*"))
    assert files, f"no event files under {logdir}"
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                seen = merged.setdefault(tag, {})
                assert seen.get(e.step, e.value) == e.value, (f, tag, e.step, seen[e.step], e.value)
                seen[e.step] = e.value
    return merged


def assert_same_safetensors(a: Path, b: Path) -> None:
    """Bit-for-bit equal tensors under the same names."""
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), (a, sorted(set(x) ^ set(y)))
    for k in x:
        assert torch.equal(x[k], y[k]), (a.name, k)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under `folder`, by relative path (to prove a checkpoint was left untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
