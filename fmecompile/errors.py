"""The errors fmecompile raises. Each message says what went wrong and what to do."""


class FmeError(Exception):
    """Base class of every error fmecompile raises on purpose."""


class ConfigError(FmeError, ValueError):
    """A `Config` field, backend option or CLI flag is invalid."""


class CaptureError(FmeError):
    """The model could not be captured as one aten graph."""


class InputError(FmeError, ValueError):
    """The inputs do not fit the model (or the compiled artifact)."""


class ArtifactError(FmeError):
    """A saved artifact cannot be loaded: damaged, from an incompatible version, or made
    for another model or other inputs."""
