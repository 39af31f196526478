"""Example calls of a model, as users hold them, normalised to ``(args, kwargs)``.

Calibration data comes in whatever form the user's model takes: a tensor, a tuple of positional
arguments, a dict of keyword arguments, a tokenizer's ``BatchEncoding`` (a ``Mapping``, not a
``dict``), or a ``Mapping`` that *is* the one positional argument (sentence-transformers'
``forward(features)``). One function decides, so capture, calibration and export see the same call.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["as_call", "normalise_calib", "fresh_args"]


def as_call(example: Any, model: torch.nn.Module | None = None) -> tuple[tuple, dict]:
    """Normalise one example call to ``(args, kwargs)``.

    Accepted: a tensor (one positional argument), a tuple or list of positional arguments, an
    explicit ``(args_tuple, kwargs_dict)`` pair, or any ``Mapping`` (dict, ``BatchEncoding``).
    A mapping is keyword arguments, unless ``model``'s ``forward`` has exactly one required
    positional parameter the mapping does not name (``SentenceTransformer.forward(input)``):
    then the mapping, as a plain ``dict``, is that argument.

    Example::

        >>> as_call({"input_ids": ids})
        ((), {'input_ids': tensor(...)})

    Raises:
        TypeError: ``example`` is none of these forms.
    """
    if isinstance(example, Mapping):
        if model is not None and _takes_mapping_positionally(model, example):
            # a plain dict: capture (torch.export) accepts only pytree containers
            return (dict(example),), {}
        return (), dict(example)
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, (tuple, list)):
        if len(example) == 2 and isinstance(example[0], (tuple, list)) and isinstance(example[1], Mapping):
            return tuple(example[0]), dict(example[1])
        return tuple(example), {}
    raise TypeError(
        "Expected an example call as a tensor, a tuple of positional args or a mapping of keyword args "
        f"(dict, BatchEncoding), but got {type(example).__name__}."
    )


def normalise_calib(calib: Iterable[Any] | None, model: torch.nn.Module | None = None) -> list[tuple[tuple, dict]]:
    """``calib`` as a list of ``(args, kwargs)`` calls; a single tensor or mapping counts as one call.

    Raises:
        TypeError: ``calib`` is not iterable, or one of its calls has none of :func:`as_call`'s forms.
    """
    if calib is None:
        return []
    if isinstance(calib, (torch.Tensor, Mapping)):
        calib = [calib]
    try:
        items = list(calib)
    except TypeError:
        raise TypeError(
            f"Expected calib= to be an iterable of example calls, but got {type(calib).__name__}. "
            "Pass calib=[example_call, ...]."
        ) from None
    return [as_call(c, model) for c in items]


def fresh_args(args: tuple) -> tuple:
    """``args`` with every mapping argument copied, for one more run of a recorded call.

    Some models write their results into a mapping they are given and return it
    (sentence-transformers' ``forward(features)`` adds ``sentence_embedding`` to ``features``):
    replaying one recorded call twice would then return the *same* object twice, and comparing a
    planned output with the exact one would compare an object with itself.
    """
    return tuple(dict(a) if isinstance(a, Mapping) else a for a in args)


def _takes_mapping_positionally(model: torch.nn.Module, mapping: Mapping) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    return len(required) == 1 and required[0].name not in mapping
