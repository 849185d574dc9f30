"""The one walker over nested batches: which values are containers, and how one is rebuilt.

A batch is a *structure*: tuples, lists and dicts holding *leaves* (arrays, tensors, numbers,
anything else). This module is the only place that decides what a container is and how a new one
of the same kind is made -- collate, the aliasing guard (``workers=0``), the slot layout and the
Ray executor's writable copy all walk a batch through it:

* a namedtuple is rebuilt as its own type; any other tuple as a plain ``tuple``;
* a list (or a list subclass that takes an iterable) as its type, else a plain ``list``;
* a dict or any other ``Mapping`` as its type built from a dict, else a plain ``dict`` (key order
  is kept either way).

``map_structure`` returns a container unchanged, the same object, when none of its leaves changed:
walking a batch that needs nothing allocates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Leaves that cannot hold anything: a walk skips them at once.
ATOMIC_TYPES = frozenset({int, float, complex, bool, str, bytes, type(None)})


_CONTAINERS = (tuple, list, dict)  # what ``map_structure`` walks into


def is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def is_container(value: Any) -> bool:
    """Whether ``map_structure`` walks into ``value``: a tuple, a list or a dict."""
    return isinstance(value, _CONTAINERS)


def flatten(value: Any) -> tuple[str, tuple[str, ...], tuple[Any, ...]] | None:
    """The top level of a plain value: ``(kind, keys, items)`` for one leaf (``"leaf"``, the value as its
    one item), an exact ``tuple`` (``"tuple"``) or an exact ``dict`` with ``str`` keys (``"dict"``, its keys
    in order); None for any other container. Its items are not looked into (the caller does: the slot
    layout takes only arrays placed in the slot). ``unflatten`` rebuilds it with no type of the user's,
    one level, exact types: the slot layout's pickle-free path, for every batch."""
    kind = type(value)
    if kind is tuple:
        return "tuple", (), value
    if kind is dict:
        keys = tuple(value)
        for key in keys:
            if type(key) is not str:
                return None
        return "dict", keys, tuple(value.values())
    return None if isinstance(value, _CONTAINERS) else ("leaf", (), (value,))


def unflatten(kind: str, keys: tuple[str, ...], leaves: Sequence[Any]) -> Any:
    """The value ``flatten`` described, with ``leaves`` in place of its leaves."""
    if kind == "tuple":
        return tuple(leaves)
    if kind == "dict":
        return dict(zip(keys, leaves, strict=True))
    return leaves[0]


def children(container: Any) -> Sequence[Any]:
    """The items of a container, in order: a tuple's or list's elements, a mapping's values."""
    if isinstance(container, (tuple, list)):
        return container
    return list(container.values())


def rebuilt(container: Any, items: Sequence[Any]) -> Any:
    """A new container of ``container``'s kind holding ``items`` (``children`` order; see the module
    docstring for which type it gets)."""
    kind = type(container)
    if kind is tuple:
        return tuple(items)
    if kind is dict:
        return dict(zip(container, items, strict=True))
    if isinstance(container, tuple):
        return kind(*items) if is_namedtuple(container) else tuple(items)
    if isinstance(container, Mapping):
        fields = dict(zip(container.keys(), items, strict=True))
        try:
            return kind(fields)
        except Exception:
            return fields
    if kind is list:
        return list(items)
    try:
        return kind(items)
    except Exception:
        return list(items)


def map_structure(
    fn: Callable[[Any], Any],
    value: Any,
    *,
    renew: Callable[[Any], bool] | None = None,
    memo: dict[int, Any] | None = None,
) -> Any:
    """``value`` with ``fn(leaf)`` in place of each leaf (tuples, lists and dicts are walked).

    A container is rebuilt (``rebuilt``) when one of its items changed, or when ``renew(container)``
    says it must be a new one; otherwise it is returned as it is. With ``memo`` (id -> result, kept
    by the caller for one walk) an object met twice is mapped once, so two places that held one object
    hold one result, as pickle would keep them (atomic leaves, which hold nothing, are not memoized)."""
    if renew is None and memo is None:
        return _map(fn, value)
    done = {} if memo is None else memo

    def walk(value: Any) -> Any:
        if type(value) in ATOMIC_TYPES:
            return fn(value)
        key = id(value)
        if key in done:
            return done[key]
        if isinstance(value, _CONTAINERS):
            items = value if not isinstance(value, dict) else list(value.values())
            mapped = [walk(item) for item in items]
            result = value
            for new, old in zip(mapped, items):
                if new is not old:
                    result = rebuilt(value, mapped)
                    break
            else:
                if renew is not None and renew(value):
                    result = rebuilt(value, mapped)
        else:
            result = fn(value)
        done[key] = result
        return result

    return walk(value)


def _map(fn: Callable[[Any], Any], value: Any) -> Any:
    """``map_structure`` without ``renew`` or ``memo``: the hot path (a slot's layout, every batch)."""
    if not isinstance(value, _CONTAINERS):
        return fn(value)
    items = value if not isinstance(value, dict) else list(value.values())
    mapped = [_map(fn, item) for item in items]
    for new, old in zip(mapped, items):
        if new is not old:
            return rebuilt(value, mapped)
    return value
