"""Progress messages. fmecompile logs what takes long (capture, each pass, each benchmark
row) to the `fmecompile` logger at INFO. Like diffusers, the library is quiet unless asked:
the logger has no handler of its own until `set_verbosity` gives it one. The `fme` command
turns it on (`fme --quiet` off).

    import fmecompile as fme
    fme.set_verbosity("info")       # per-phase lines on stderr
    fme.set_verbosity("warning")    # quiet again (warnings only)
    fme.set_verbosity(None)         # back to the default: no handler, records go to the root logger
"""
from __future__ import annotations

import logging
import sys
from typing import IO

from .errors import ConfigError

LOGGER = "fmecompile"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMAT = "[fme %(relativeCreated)6.0fms] %(message)s"


class _ProgressHandler(logging.StreamHandler):
    """The handler set_verbosity installs; marked by its class so a second call replaces it."""


def set_verbosity(level: str | int | None = "info", stream: IO[str] | None = None) -> None:
    """Shows fmecompile's messages of `level` and above ("debug", "info", "warning",
    "error", or a logging level) on `stream` (default: stderr). None: the default again,
    where the application's logging configuration alone decides."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ConfigError(f"unknown verbosity {level!r}; choose from {list(LEVELS)} or None")
        level = LEVELS[level.lower()]
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _ProgressHandler)]:
        logger.removeHandler(handler)
    if level is None:
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        return
    handler = _ProgressHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    # Our handler prints them; the root's (if an application configured one) would print twice.
    logger.propagate = False
