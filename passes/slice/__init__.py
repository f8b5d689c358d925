"""Feature Slicer: regions of ops independent along an axis run as loops over chunks of it,
exactly. The pass is `slicer.slice_pass`; its docstring lists the modules in data order."""
