"""Fixtures of the reliability tests: one thread, fresh Accelerate state, tiny autoencoder and teacher folders."""
import importlib.util
import sys
from pathlib import Path

import pytest
from stage_scripts import save_tiny_ae

# The test modules `import reliability_harness` (pytest's importlib mode puts no test folder on sys.path).
_spec = importlib.util.spec_from_file_location("reliability_harness", Path(__file__).with_name("harness.py"))
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness
_spec.loader.exec_module(harness)


@pytest.fixture(autouse=True, scope="module")
def _reliability_one_thread(one_thread_module):
    """Every reliability test runs small models: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory) -> Path:
    return save_tiny_ae(tmp_path_factory.mktemp("ae") / "autoencoder")


@pytest.fixture(scope="session")
def nan_ae(tmp_path_factory) -> Path:
    """The same architecture with a NaN weight: every latent, and so every loss, is NaN."""
    return save_tiny_ae(tmp_path_factory.mktemp("nan-ae") / "autoencoder", poison=True)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """A tiny random stage-2 model folder to distill."""
    from ldm.pipeline import save_random_model
    folder = tmp_path_factory.mktemp("teacher")
    save_random_model(str(folder), resolution=32)
    return folder
