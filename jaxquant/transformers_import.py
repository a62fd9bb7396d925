"""Importing transformers for the tokenizer: one lock, and (in the ``jaxquant`` command) without torch.

``jaxquant ptq`` imports transformers on a thread while the main thread loads the checkpoint (``cli.py``), and the
tokenizer may be loaded on another (``cli_overlap.py``). transformers' lazily populated top-level module is not
safe to import from two threads at once (one of them can find ``AutoTokenizer`` missing), so every jaxquant import
of it goes through ``TRANSFORMERS_IMPORT``.

The ``jaxquant`` command needs transformers only for tokenizers, yet ``transformers.AutoTokenizer`` imports torch
whenever torch is installed (through its config classes). On a GPU host that import took 8 s on its own and 20 s
when it shared the interpreter with the checkpoint loader and the XLA compilation (probe_ptq_phases.py), the whole
critical path of loading. ``hide_torch()`` makes the command behave as on a machine without torch, which is how
most JAX installs look and how transformers' tokenizers are meant to be usable: tokenizer classes are resolved
from the checkpoint's files and the ``tokenizers`` library, with nothing from torch
(tests/converters/test_converters_real.py checks both give the same class, token ids and special tokens).
"""

from __future__ import annotations

import logging
import sys
import threading

TRANSFORMERS_IMPORT = threading.RLock()


def auto_tokenizer():
    """``transformers.AutoTokenizer``, imported under the lock (it imports torch where torch is installed)."""
    with TRANSFORMERS_IMPORT:
        from transformers import AutoTokenizer
    return AutoTokenizer


def hide_torch() -> bool:
    """Make torch look uninstalled to this process (``sys.modules["torch"] = None``: ``import torch`` raises
    ImportError, ``importlib.util.find_spec("torch")`` returns None). For the ``jaxquant`` command only, which
    never uses torch; a library user's process is left alone. Returns whether it hid it (False when torch is
    already imported)."""
    if "torch" in sys.modules:
        return False
    sys.modules["torch"] = None
    # transformers then says "PyTorch was not found..." on import: true of this process, misleading to a user
    # whose machine has torch, and nothing the command needs.
    logging.getLogger("transformers").addFilter(_NoTorchAdvice())
    return True


class _NoTorchAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


__all__ = ["TRANSFORMERS_IMPORT", "auto_tokenizer", "hide_torch"]
