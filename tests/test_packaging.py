"""The install layout: `kernels/` imports as `ldm.kernels`, never as a top-level `kernels`.

PyPI has a package named `kernels` that transformers (>= 5 requires it) and diffusers import; our
folder must not stand in for it, neither from a neutral folder (as a user's script runs) nor from
the repository root (where `python -m ldm.bench` puts the root first on sys.path). Each case runs
in a subprocess.
"""
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _start(code: str, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    """The started process's stdout, once it exited cleanly."""
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()  # no-op after a clean exit
    assert proc.returncode == 0, stderr
    return stdout


def _run(code: str, cwd) -> str:
    return _finish(_start(code, cwd))


def _pypi_kernels_installed() -> bool:
    try:
        metadata.distribution("kernels")
        return True
    except metadata.PackageNotFoundError:
        return False


def test_kernels_folder_is_ldm_kernels_not_top_level(tmp_path):
    out = _run("""
        import importlib.util, ldm.kernels
        spec = importlib.util.find_spec("kernels")
        print(spec is None or "site-packages" in spec.origin)
        print(ldm.kernels.__file__)
    """, tmp_path)
    not_ours, path = out.split()
    assert not_ours == "True"
    assert Path(path).resolve() == ROOT / "kernels" / "__init__.py"


@pytest.mark.parametrize("where", ["neutral folder", "repository root"])
def test_top_level_kernels_is_the_pypi_package_or_absent(tmp_path, where):
    out = _run("""
        try:
            import kernels
            print(kernels.__file__)
        except ModuleNotFoundError as err:
            print("absent", err.name)
    """, tmp_path if where == "neutral folder" else ROOT)
    if _pypi_kernels_installed():
        found = Path(out.strip()).resolve()
        assert found.parent != ROOT / "kernels"
        assert found == Path(metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    else:
        assert out.split() == ["absent", "kernels"]


def test_root_folder_without_the_pypi_package_imports_as_absent():
    """Hide site-packages: from the root, `import kernels` must fail as a missing module, not load ours."""
    out = _run("""
        import sys
        sys.path = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
        try:
            import kernels
            print("imported", kernels.__file__)
        except ModuleNotFoundError as err:
            print("absent", err.name, "kernels" in sys.modules)
    """, ROOT)
    assert out.split() == ["absent", "kernels", "False"]


def test_transformers_and_diffusers_unaffected(tmp_path):
    """From a neutral folder and from the repository root, side by side: each process is one core's imports."""
    code = """
        import ldm, ldm.ops
        import transformers.utils
        print(transformers.utils.is_kernels_available())
        import diffusers
        from diffusers import DDIMScheduler, UNet2DConditionModel, AutoencoderKL
        from transformers import CLIPTextModel
        print("ok")
    """
    procs = {"neutral folder": _start(code, tmp_path), "repository root": _start(code, ROOT)}
    for where, proc in procs.items():
        assert _finish(proc).split() == [str(_pypi_kernels_installed()), "ok"], where
