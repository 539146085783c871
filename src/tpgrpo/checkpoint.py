"""Atomic checkpoints (DESIGN §10): written into a temporary directory, fsynced, then renamed into place, so a
crash mid-write never damages the last good checkpoint. Weights are safetensors; the optimizer state is loaded
with ``torch.load(weights_only=True)``; nothing is unpickled."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, epoch: int, payload: dict) -> Path:
    """payload: {"lora": {name: tensor}, "ema": {name: tensor}, "optimizer": state_dict, "state": json-able}."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in payload["lora"].items()}, str(tmp / "lora.safetensors"))
        save_file({k: v.contiguous() for k, v in payload["ema"].items()}, str(tmp / "ema.safetensors"))
        torch.save(payload["optimizer"], tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(payload["state"]))
        (tmp / COMPLETE).write_text("ok\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same epoch: move the old one aside first
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint is intact") from None
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    return final


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("epoch_*") if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user means by ``path``: a checkpoint directory, the ``latest`` pointer file, a run's
    ``checkpoints/`` directory or the run directory itself (the last two give the newest complete checkpoint)."""
    path = Path(path)
    if path.is_file() and path.name == "latest":
        path = path.parent / path.read_text().strip()
    elif path.is_dir() and not is_complete(path):
        run_dir = path.parent if path.name == "checkpoints" else path
        found = find_latest_checkpoint(run_dir)
        if found is not None:
            path = found
    if not is_complete(path):
        what = "does not exist" if not path.exists() else "is not a complete checkpoint (nor a run directory with one)"
        raise FileNotFoundError(f"{path} {what}")
    return path


def load_checkpoint(path: Path) -> dict:
    path = resolve_checkpoint(path)
    return {
        "lora": load_file(str(path / "lora.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
    }
