"""Fixtures shared by the calibration tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _tiny_llama, whatever the import mode


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A one-layer HF Llama with heavy-tailed projection weights, saved to disk."""
    from _tiny_llama import write_llama

    return write_llama(tmp_path_factory, "lh_llama", layers=1, max_pos=64)
