"""fmecompile: a PyTorch FX graph-rewriting compiler that makes video diffusion models
(Stable Video Diffusion, SVD-XT, AnimateDiff) run in less memory, faster, with the same
outputs.

    import fmecompile as fme
    compiled = fme.compile(unet, kwargs=example_inputs, config=fme.Config(passes=("slice", "group")))
    unet = torch.compile(unet, backend="fme", options={"passes": ("slice", "group")})
"""
import logging

from .compiled import CompiledModule, compile
from .config import Config
from .errors import CaptureError, ConfigError, FmeError, InputError

__version__ = "0.1.0"
__all__ = ["CompiledModule", "compile", "Config", "FmeError", "ConfigError", "CaptureError",
           "InputError", "__version__"]

logging.getLogger("fmecompile").addHandler(logging.NullHandler())
