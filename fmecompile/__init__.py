"""fmecompile: a PyTorch FX graph-rewriting compiler that makes video diffusion models
(Stable Video Diffusion, SVD-XT, AnimateDiff) run in less memory, faster, with the same
outputs.

    import fmecompile as fme
    compiled = fme.compile(unet, kwargs=example_inputs, config=fme.Config(passes=("slice", "group")))
    unet = torch.compile(unet, backend="fme", options={"passes": ("slice", "group")})
    fme.optimize(pipe)    # a whole SVD / AnimateDiff pipeline: its UNet and VAE decoder
    fme.plan("svd-xt", frames=25, height=576, width=1024, gpu_memory="6GiB")   # what fits
"""

from .artifacts import load, save
from .check import check
from .contract import CheckResult, CheckWarning
from .compiled import CompiledModule, compile
from .config import Config
from .errors import ArtifactError, CaptureError, ConfigError, FmeError, InputError
from .optimize import optimize, restore
from .planner import PipelinePlan, plan
from .progress import set_verbosity
from .rehash import Calibration, calibrate
from .version import __version__

__all__ = ["CompiledModule", "compile", "Config", "FmeError", "ConfigError", "CaptureError",
           "InputError", "__version__", "save", "load", "ArtifactError", "optimize", "restore",
           "calibrate", "Calibration", "set_verbosity", "check", "CheckResult", "CheckWarning",
           "plan", "PipelinePlan"]

set_verbosity(None)  # the default handler: warnings and compile notices on stderr (progress.py)
