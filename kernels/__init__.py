"""Kernels of fmecompile: torch custom ops (namespace fme) with plain-torch reference
implementations and, for most, Triton kernels. Importing this package registers the ops,
which graphs holding them need before they run or load; it needs no GPU (without one, the ops
run their references, or their kernels under the Triton interpreter: see _common.py)."""

# Run from the repository root (python -m pytest, python -c), this folder is also importable as
# a top-level `kernels`, which shadows Hugging Face's `kernels` distribution: transformers (>= 5)
# requires and imports that one, and diffusers' model imports then fail. So imported under that
# name, this file loads the distribution in its place, or fails as a missing module would (the
# import probes of libraries expect ModuleNotFoundError). The ops register only as
# fmecompile.kernels, never twice.
if __name__ == "fmecompile.kernels":
    from . import group_norm  # noqa: F401  (fme::gn_moments, merge_moments, gn_apply, group_norm)
    from . import residual_add  # noqa: F401  (fme::residual_add)
    from . import alpha_blend  # noqa: F401  (fme::alpha_blend)
    from . import geglu  # noqa: F401  (fme::geglu)
    from . import layer_norm  # noqa: F401  (fme::layer_norm)
else:
    def _load_the_distribution() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.realpath(__file__)
        checkout = os.path.dirname(os.path.dirname(here))
        elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
        if spec is not None and spec.origin and os.path.realpath(spec.origin) == here:
            spec = None  # this folder again, through another path to the checkout
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(
                f"No module named {__name__!r} (this checkout's kernels/ folder is fmecompile.kernels: "
                f"import it by that name)", name=__name__)
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module  # the import statement returns what sys.modules holds
        spec.loader.exec_module(module)

    _load_the_distribution()
