"""Our Triton kernels. They import as `ldm.kernels` (pyproject's package-dir maps this folder there).

Run from the repository root, Python also finds this folder as a top-level package `kernels`, which
would shadow the PyPI package of that name (transformers >= 5 requires it, diffusers imports from it).
Imported under that name, this file hands over to the PyPI package, or fails as if it were absent.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is ldm.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module            # the import statement returns what sys.modules holds
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise
