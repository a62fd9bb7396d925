"""The module walk: every NNX module (``iter_modules``) or variable (``iter_variables``) of a model with its path, the
same sequence as ``nnx.iter_modules`` / ``nnx.to_flat_state(nnx.state(model, kind))``, 4-8x faster.

``nnx.iter_modules`` visits every node of the graph (each ``Variable``, array and static attribute: ~90k isinstance
checks on a 32-layer decoder with its ~800 quantizers, 45 ms on a 2-core CPU); calibration, finalize and export walk
the model for its quantizers a few dozen times per job. This walk descends only into what can hold a module (modules,
``nnx.List`` and other graph containers), reads a module's attributes with ``vars`` (sorted, as NNX orders them) and
caches the kind of each attribute type: 10 ms for the same model (``iter_variables``: 15 ms against 120 ms for a
``State`` of its parameters). Same paths, same objects, same order (``tests/models/test_walk.py`` compares both with
NNX on every family).
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


def _children(node: Any, is_module: bool) -> list[tuple[Any, Any]]:
    """``node``'s ``(key, child)`` pairs in NNX's order: a module's attributes sorted by name (``vars``), a graph
    container's (and ``nnx.List``'s, keyed by int) as its node implementation lists them."""
    if is_module and not isinstance(node, nnx.List):
        return sorted(vars(node).items())
    return list(graphlib.get_node_impl(node).node_dict(node).items())


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
        for key, child in reversed(_children(node, is_module)):
            if _kind(child) != _LEAF:
                stack.append(((*path, key), child, False))


def iter_variables(root: Any, kind: type = nnx.Param) -> Iterator[tuple[tuple, Variable]]:
    """``(path tuple, variable)`` for every ``kind`` variable under ``root``, each once, in the order of
    ``nnx.to_flat_state(nnx.state(root, kind))`` -- without building a ``State`` (a flatten of the whole graph)."""
    visited: set[int] = set()
    stack: list[tuple[tuple, Any]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, Variable):
            if isinstance(node, kind):
                yield path, node
            continue
        for key, child in reversed(_children(node, _kind(node) == _MODULE)):
            if _kind(child) != _LEAF or isinstance(child, Variable):
                stack.append(((*path, key), child))


__all__ = ["iter_modules", "iter_variables"]
