"""The install layout: `kernels/` imports as `ldm.kernels`, never as a top-level `kernels`.

PyPI has a package named `kernels` that transformers and diffusers probe for; if our
folder shadowed it they would try to use it. Run in a subprocess from a neutral folder,
as a user's script would be.
"""
import subprocess
import sys
import textwrap


def _run(code: str, cwd) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_kernels_folder_is_ldm_kernels_not_top_level(tmp_path):
    out = _run("""
        import importlib.util, ldm.kernels
        print(importlib.util.find_spec("kernels") is None)
        print(ldm.kernels.__file__)
    """, tmp_path)
    no_top_level, path = out.split()
    assert no_top_level == "True"
    assert path.replace("\\\\", "/").endswith("kernels/__init__.py")


def test_transformers_and_diffusers_unaffected(tmp_path):
    out = _run("""
        import ldm, ldm.ops
        import transformers.utils
        print(transformers.utils.is_kernels_available())
        import diffusers
        from diffusers import DDIMScheduler, UNet2DConditionModel, AutoencoderKL
        from transformers import CLIPTextModel
        print("ok")
    """, tmp_path)
    assert out.split() == ["False", "ok"]
