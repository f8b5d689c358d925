"""Progress messages. fmecompile logs what takes long (capture, each pass, each benchmark
row) to the `fmecompile` logger at INFO, which has no handler of its own until
`set_verbosity` gives it one (the `fme` command turns it on, `fme --quiet` off). A compile
also announces itself in one line at WARNING (`announce_compile`), so that even at the
default verbosity a first call that compiles for a minute is not a silent prompt: by default
WARNING records print on stderr (as diffusers prints its own), unless the application
configured logging, whose handlers then get them.

    import fmecompile as fme
    fme.set_verbosity("info")       # per-phase lines on stderr
    fme.set_verbosity("warning")    # warnings and the one-line compile notices only
    fme.set_verbosity("error")      # silent: errors only
    fme.set_verbosity(None)         # the default again: warnings and notices on stderr, or to your logging
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import IO, Iterator

from .errors import ConfigError

LOGGER = "fmecompile"
log = logging.getLogger(LOGGER)
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMAT = "[fme %(relativeCreated)6.0fms] %(message)s"


class _ProgressHandler(logging.StreamHandler):
    """The handler set_verbosity installs; marked by its class so a second call replaces it."""


class _DefaultHandler(logging.Handler):
    """The default: fmecompile's warnings (its compile notices among them) on stderr, as
    diffusers prints its own, but only while the application has configured no logging;
    once it has (a handler on the root logger), the records propagate there alone. It also
    stands where libraries put a NullHandler, which would hide them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            sys.stderr.write(self.format(record) + "\n")  # sys.stderr now: it may have been replaced


def set_verbosity(level: str | int | None = "info", stream: IO[str] | None = None) -> None:
    """Shows fmecompile's messages of `level` and above ("debug", "info", "warning",
    "error", or a logging level) on `stream` (default: stderr). None: the default again:
    warnings and compile notices on stderr, or, where the application configured logging,
    as its configuration decides."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ConfigError(f"unknown verbosity {level!r}; choose from {list(LEVELS)} or None")
        level = LEVELS[level.lower()]
    for handler in [h for h in log.handlers if isinstance(h, (_ProgressHandler, _DefaultHandler))]:
        log.removeHandler(handler)
    if level is None:
        log.addHandler(_DefaultHandler())
        log.setLevel(logging.NOTSET)
        log.propagate = True
        return
    handler = _ProgressHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    log.addHandler(handler)
    log.setLevel(level)
    # Our handler prints them; the root's (if an application configured one) would print twice.
    log.propagate = False


# What a compile takes, from measurements on the project's 2-core CPU machine: the tiny SVD
# UNet (991 modules) captured in 4.6 s and compiled with the default passes in 18 s, the
# real-size one (1,542 modules) in 38 s; per node of the graph dynamo hands the backend,
# the tiny UNet's 2,357 nodes in 18 s. A rough guide, said as such; faster hosts take less.
CAPTURE_SECONDS_PER_MODULE = 0.005
PASSES_SECONDS_PER_MODULE = 0.015
BACKEND_SECONDS_PER_NODE = 0.008


def compile_estimate(modules: int, passes: bool) -> float:
    return modules * (CAPTURE_SECONDS_PER_MODULE + (PASSES_SECONDS_PER_MODULE if passes else 0.0))


def announce_compile(what: str, inputs: str, seconds: float) -> None:
    """The one line a compile shows before it starts: what, for which inputs, roughly how
    long, and the switches for more or for silence."""
    rough = "under 10 s" if seconds < 10 else f"roughly {_duration(seconds)}"
    log.warning("fmecompile: compiling %s for %s (%s; fmecompile.set_verbosity(\"info\") shows each "
                "phase, set_verbosity(\"error\") hides this)", what, inputs, rough)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


@contextlib.contextmanager
def heartbeat(what: str, every: float = 30.0) -> Iterator[None]:
    """While inside, an INFO line every `every` seconds ("what: still running after 90 s"),
    for work that reports nothing of its own for minutes (Inductor compiling a UNet)."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            log.info("%s: still running after %.0f s", what, time.perf_counter() - start)
    thread = threading.Thread(target=beat, name="fmecompile-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
