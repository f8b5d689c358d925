"""Step Rehash, the graph side: `cut.py` cuts the canonical graph at a cache point into the
full and partial graphs of one program; `schedule.py` says which denoising steps run in
full. The runtime side (step counting, the cache, calibration) is fmecompile/rehash.py."""
