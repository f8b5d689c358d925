"""Operator Grouping: chains of memory-bound ops become one fused kernel (kernels/). The
pass is `grouper.group_pass`; the chains it fuses are the entries of `patterns.py`."""
