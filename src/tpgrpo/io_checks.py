"""Checks of user-given paths, made before any expensive work: each failure is a ValueError with one line naming
the flag or field and the path."""

from __future__ import annotations

from pathlib import Path


def first_line(e: BaseException) -> str:
    """An exception's message for a one-line error: its first line (or its type when it has none)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _first_existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def output_dir(what: str, path: str | Path) -> Path:
    """A directory we may create (or reuse): not an existing file, not below a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what}: {p} is a file, not a directory")
    parent = _first_existing_parent(p)
    if not parent.is_dir():
        raise ValueError(f"{what}: {p} lies below {parent}, which is a file")
    return p


def output_file(what: str, path: str | Path, suffixes: tuple[str, ...] | None = None) -> Path:
    """A file we may write: not a directory, its directory creatable, and (if given) one of ``suffixes``."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what}: {p} is a directory, not a file")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ValueError(f"{what}: {p} must end in {' or '.join(suffixes)}")
    output_dir(what, p.parent if str(p.parent) else ".")
    return p


def input_file(what: str, path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist")
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a file")
    return p


def load_module_with_config(path: Path, kind: str, build):
    """A module saved as safetensors with its config (JSON) in the file's metadata: ``build(config)`` constructs it,
    then the file's tensors (as float32) load into it. Any problem is a one-line ValueError naming the file."""
    import json

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        config = json.loads(meta.get("config", "{}"))
        if not isinstance(config, dict):
            raise ValueError("its metadata holds no model config")
        module = build(config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: not a {kind} safetensors file ({first_line(e)})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module
