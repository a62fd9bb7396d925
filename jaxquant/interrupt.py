"""Ctrl-C that is never lost.

Python turns SIGINT into ``KeyboardInterrupt`` in whatever Python code runs when the signal is
handled. If that code is a garbage-collector callback (JAX registers one) or a ``__del__``, the
interpreter reports "Exception ignored in ..." and *swallows* the exception: the run goes on to a
full export and exits 0. The ``jaxquant`` command therefore installs :func:`install`, whose handler
also records the interrupt, and checks the record at every point where work would be published
(:func:`raise_if_interrupted`: before an export directory or state file is renamed into place, at
phase boundaries, at exit). A recorded interrupt always ends the command with status 130.

Library users who never call :func:`install` are unaffected: the checks are then no-ops.
"""

from __future__ import annotations

import contextlib
import signal
import sys

_installed = False
_hit = False
_deferred = False
_default_unraisablehook = sys.unraisablehook


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    global _hit
    _hit = True
    if not _deferred:
        raise KeyboardInterrupt


def _unraisablehook(unraisable):
    # The swallowed KeyboardInterrupt is recorded and acted on; do not print its traceback.
    if _hit and unraisable.exc_type is KeyboardInterrupt:
        return
    _default_unraisablehook(unraisable)


def install() -> None:
    """Route SIGINT through a handler that records it (main thread only; idempotent)."""
    global _installed, _hit
    try:
        current = signal.getsignal(signal.SIGINT)
        if current is _handler:
            return  # already active (``python -m jaxquant`` installs it before importing the command)
        if current is signal.SIG_IGN:
            return  # started with SIGINT ignored (nohup, a background job): keep it that way
        _hit = False
        signal.signal(signal.SIGINT, _handler)
    except ValueError:  # not the main thread: keep Python's default
        return
    sys.unraisablehook = _unraisablehook
    _installed = True


@contextlib.contextmanager
def deferred():
    """Record a Ctrl-C inside the block but raise it only at the end of the block.

    For imports of compiled extensions: a ``KeyboardInterrupt`` raised while one initializes can
    abort the interpreter (SIGABRT) or surface as an ``ImportError``.
    """
    global _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = False
    raise_if_interrupted()


def interrupted() -> bool:
    """True once SIGINT arrived after :func:`install`, even if the exception was swallowed."""
    return _hit


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if an interrupt was recorded (a swallowed one included)."""
    if _hit:
        raise KeyboardInterrupt


__all__ = ["deferred", "install", "interrupted", "raise_if_interrupted"]
