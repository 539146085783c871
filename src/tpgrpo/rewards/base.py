"""Reward protocol and registry."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch of uint8 RGB images [N, H, W, 3] for their prompts.

    Returns a dict of per-image float64 score arrays; ``primary`` names the one that trains. A scorer that fails
    raises — a failed reward is never turned into 0."""

    primary: str

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict] | None = None
                 ) -> dict[str, np.ndarray]: ...


_REGISTRY: dict[str, Callable[..., RewardFunction]] = {}


def register_reward(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def _import_object(path: str):
    """``package.module:attr`` or ``path/to/file.py:attr`` → the object (the working directory is importable, as
    for ``python -m``). One-line ValueErrors name what failed."""
    target, _, attr = path.rpartition(":")
    if not target or not attr:
        raise ValueError(f"reward.name: {path!r}: expected a registered name or module:attribute")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise ValueError(f"reward.name: {path!r}: file not found: {file}")
            spec = importlib.util.spec_from_file_location(f"tpgrpo_user_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except ValueError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, on one line
        raise ValueError(f"reward.name: {path!r}: cannot import {target} ({type(e).__name__}: {one_line(e)})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward.name: {path!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _user_reward(path: str, kwargs: dict) -> RewardFunction:
    """A reward given by import path: a scorer object (with ``primary`` and ``__call__``), or a factory — a class or
    function — that the reward's options are passed to and that returns one."""
    obj = _import_object(path)
    if not callable(obj):
        raise ValueError(f"reward.name: {path!r} is not callable")
    is_scorer = not inspect.isclass(obj) and isinstance(getattr(obj, "primary", None), str)
    if is_scorer:
        if kwargs:
            raise ValueError(f"reward {path!r}: a scorer object takes no options (got {', '.join(sorted(kwargs))}); "
                             f"point reward.name at a factory instead")
        scorer = obj
    else:
        try:
            scorer = obj(**kwargs)
        except TypeError as e:
            raise ValueError(f"reward {path!r}: bad options ({one_line(e)})") from None
    if not callable(scorer) or not isinstance(getattr(scorer, "primary", None), str):
        raise ValueError(f"reward.name: {path!r} must be a scorer with a `primary` score name and "
                         f"__call__(images, prompts, metadata=None), or a factory returning one")
    return scorer


def build_reward(name: str, **kwargs) -> RewardFunction:
    """A registered reward by name, or your own by import path (``module:attr`` or ``file.py:attr``)."""
    if name not in _REGISTRY and ":" in name:
        return _user_reward(name, kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"reward.name: unknown reward {name!r}; registered: {', '.join(registered_rewards())} "
                         f"(or module:attribute for your own)")
    factory = _REGISTRY[name]
    if kwargs:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = None
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                known = ", ".join(k for k in params if k != "self") or "none"
                raise ValueError(f"reward {name!r}: unknown option(s) {', '.join(unknown)}; its options: {known}")
    return factory(**kwargs)


def check_batch(reward: str, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> np.ndarray:
    """Validate a scorer's inputs and return the images as uint8 [N, H, W, 3].

    Raises a one-line ValueError naming the reward and the problem (wrong array shape or dtype, different numbers
    of images and prompts or metadata entries, a prompt that is not a string)."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{reward}: images must be an array [N, H, W, 3], got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{reward}: images must be uint8, got {arr.dtype}")
    if isinstance(prompts, str):
        raise ValueError(f"{reward}: prompts must be a list of strings, got a single string")
    if len(arr) != len(prompts):
        raise ValueError(f"{reward}: {len(arr)} images but {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"{reward}: prompt {i} is {type(p).__name__}, not a string")
    if metadata is not None and len(metadata) != len(arr):
        raise ValueError(f"{reward}: {len(arr)} images but {len(metadata)} metadata entries")
    return arr


def one_line(e: BaseException) -> str:
    """An exception's message on one line (for error messages that embed another library's error)."""
    msg = " ".join(str(e).split())
    return msg if msg else type(e).__name__
