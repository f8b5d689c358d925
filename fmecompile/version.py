"""The release of fmecompile (artifacts record it; `fme --version` prints it)."""
__version__ = "0.1.0"
