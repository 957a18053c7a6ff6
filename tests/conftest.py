"""Suite-wide setup: Triton's interpreter on machines without CUDA, and a clean Accelerate state per test.

TRITON_INTERPRET must be set before triton is imported anywhere (triton.jit reads it
when a kernel is decorated), so it lives here, in the root conftest, which pytest
loads before collecting any test module.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

try:  # torch is cheap to ask; triton itself is not imported here.
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing means nothing else runs either
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread for the whole suite (and, through the environment, for the processes it launches): its
# models are tiny, so threads only help when a core is idle and spin when it is not. 2-core dev machine, 2026-12-07,
# `OMP_NUM_THREADS=N pytest tests/models/test_sdxl.py tests/diffusion ...`: idle 80.3 s (2) vs 80.1 s (1); with one
# other job running 103-110 s vs 70-73 s. Tests that want more threads set them themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
except (NameError, ValueError):  # no torch, or a value torch cannot take: leave its default
    pass

@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the README's command): a worker a core, as every test runs on one thread, but at most 8, so that a
    big machine does not hold dozens of copies of torch and the test models."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


# tests/stage_scripts.py as the module `stage_scripts` (pytest's importlib mode puts no test folder on sys.path)
_spec = importlib.util.spec_from_file_location("stage_scripts", Path(__file__).with_name("stage_scripts.py"))
sys.modules["stage_scripts"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules["stage_scripts"])


def _reset_accelerate() -> None:
    state = sys.modules.get("accelerate.state")  # only if a test (or what it imports) loaded Accelerate
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each stage run builds its own Accelerator: clear Accelerate's process-wide singletons around every test."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on shared cores those threads spin."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The same setting for one test, or for a module of small-model runs (its fixtures included).
one_thread = pytest.fixture(_one_thread, name="one_thread")
one_thread_module = pytest.fixture(_one_thread, scope="module", name="one_thread_module")


@pytest.fixture
def mixed_aspect_folder(tmp_path):
    """An imagefolder of 2 wide (80x48), 2 square (64x64) and 2 tall (48x80) flat pictures, captioned
    "picture i": at 32 px with bucket step 8 they fill the buckets 40x24, 32x32 and 24x40."""
    import json

    from PIL import Image
    folder = tmp_path / "mixed-aspect"
    folder.mkdir()
    rows = []
    for i, size in enumerate([(80, 48)] * 2 + [(64, 64)] * 2 + [(48, 80)] * 2):
        Image.new("RGB", size, (40 * i, 100, 200 - 30 * i)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(rows))
    return folder
