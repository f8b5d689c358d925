"""What runs a compiled program: `program` (a program per input signature, its graphs and
step runner), `loop` (a sliced region as a loop over chunks), `cuda_graphs` (capture once,
replay), `distributed` and `sharded` (loops shared across torch.distributed ranks) and
`offload` (diffusers' weight offloading hooks around a compiled call).

The package itself imports nothing: `loop` and `distributed` are read by the passes, which
come before the rest of the runtime on the data path (tests/test_structure.py)."""
