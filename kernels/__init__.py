"""Kernels of fmecompile: torch custom ops with plain-torch reference implementations
(and, for the grouping pass, Triton implementations). Importing this package registers
the ops, which graphs holding them need before they run or load."""
from . import group_norm  # noqa: F401  (registers fme::group_norm_*)
