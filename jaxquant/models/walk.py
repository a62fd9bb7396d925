"""The module walk: every NNX module of a model with its path, the same sequence as ``nnx.iter_modules``, 4-5x faster.

``nnx.iter_modules`` visits every node of the graph (each ``Variable``, array and static attribute: ~90k isinstance
checks on a 32-layer decoder with its ~800 quantizers, 45 ms on a 2-core CPU); calibration, finalize and export walk
the model for its quantizers a few dozen times per job. This walk descends only into what can hold a module (modules,
``nnx.List`` and other graph containers), reads a module's attributes with ``vars`` (sorted, as NNX orders them) and
caches the kind of each attribute type: 10 ms for the same model. Same paths, same objects, same post-order
(``tests/models/test_walk.py`` compares it with ``nnx.iter_modules`` on every family).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flax import nnx
from flax.nnx import graphlib
from flax.nnx.variablelib import Variable

_MODULE, _CONTAINER, _LEAF = 2, 1, 0
_KINDS: dict[type, int] = {}


def _kind(x: Any) -> int:
    """Whether ``x`` is a module, a graph container that may hold modules (lists, dicts, ``nnx.List``), or a leaf
    (a ``Variable``, an array, a static value); cached per type."""
    t = type(x)
    k = _KINDS.get(t)
    if k is None:
        if issubclass(t, nnx.Module):
            k = _MODULE
        elif issubclass(t, Variable):
            k = _LEAF
        else:
            k = _CONTAINER if graphlib.is_node(x) else _LEAF
        _KINDS[t] = k
    return k


def iter_modules(root: Any) -> Iterator[tuple[tuple, nnx.Module]]:
    """``(path tuple, module)`` for every module under ``root`` (itself included, path ``()``), each once, children
    before their parent: what ``nnx.iter_modules(root)`` yields."""
    visited: set[int] = set()
    stack: list[tuple[tuple, Any, bool]] = [((), root, False)]
    while stack:
        path, node, done = stack.pop()
        if done:
            yield path, node
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        is_module = _kind(node) == _MODULE
        if is_module:
            stack.append((path, node, True))
        if is_module and not isinstance(node, nnx.List):  # nnx.List keys its items by int: NNX's own flatten
            items = sorted(vars(node).items())
        else:
            items = list(graphlib.get_node_impl(node).node_dict(node).items())
        for key, child in reversed(items):
            if _kind(child) != _LEAF:
                stack.append(((*path, key), child, False))


__all__ = ["iter_modules"]
