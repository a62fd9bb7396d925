"""One lock around importing transformers.

``jaxquant ptq`` imports transformers on a thread while the main thread loads the checkpoint (``cli.py``), and the
tokenizer may be loaded on another (``cli_overlap.py``). transformers' lazily populated top-level module is not
safe to import from two threads at once (one of them can find ``AutoTokenizer`` missing), so every jaxquant import
of it goes through ``TRANSFORMERS_IMPORT``.
"""

from __future__ import annotations

import threading

TRANSFORMERS_IMPORT = threading.RLock()


def auto_tokenizer():
    """``transformers.AutoTokenizer``, imported under the lock (it imports torch where torch is installed)."""
    with TRANSFORMERS_IMPORT:
        from transformers import AutoTokenizer
    return AutoTokenizer


__all__ = ["TRANSFORMERS_IMPORT", "auto_tokenizer"]
