"""Fixtures of the stage tests: a tiny random autoencoder folder for the latent stages."""
from pathlib import Path

import pytest
from stage_scripts import save_tiny_ae


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory) -> Path:
    """A random f=2 autoencoder saved like stage 1 saves one."""
    return save_tiny_ae(tmp_path_factory.mktemp("ae") / "autoencoder")
