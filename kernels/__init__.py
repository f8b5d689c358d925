"""Kernels of fmecompile: torch custom ops (namespace fme) with plain-torch reference
implementations and, for most, Triton kernels. Importing this package registers the ops,
which graphs holding them need before they run or load; it needs no GPU (without one, the ops
run their references, or their kernels under the Triton interpreter: see _common.py)."""

# Run from the repository root, this folder is also importable as a top-level `kernels`, and
# libraries probing for Hugging Face's `kernels` package (transformers does) import it:
# register the ops only as fmecompile.kernels, never twice.
if __name__ == "fmecompile.kernels":
    from . import group_norm  # noqa: F401  (fme::gn_moments, merge_moments, gn_apply, group_norm)
    from . import residual_add  # noqa: F401  (fme::residual_add)
    from . import alpha_blend  # noqa: F401  (fme::alpha_blend)
    from . import geglu  # noqa: F401  (fme::geglu)
    from . import layer_norm  # noqa: F401  (fme::layer_norm)
