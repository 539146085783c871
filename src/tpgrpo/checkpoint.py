"""Atomic, checksummed checkpoints (docs/design.md §10): written into a temporary directory with a SHA-256 of every file,
fsynced, then renamed into place, so a crash mid-write never damages the last good checkpoint and a file damaged
later is caught on load. Weights are safetensors; the optimizer state is loaded with ``torch.load(weights_only=True)``;
nothing is unpickled.

A sharded run (``distributed.strategy: fsdp2``) writes a *sharded* checkpoint instead: every process writes its shards
of the trained weights, their EMA and the optimizer state with ``torch.distributed.checkpoint`` into ``shards/`` (a
shared filesystem across nodes), and the main process adds ``state.json``, the checksums and ``COMPLETE`` and
renames the directory into place. :func:`load_checkpoint` consolidates one into full tensors in a single process
(``tpgrpo consolidate``, ``export-lora`` and ``sample`` use it); a sharded run resumes from its shards."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
CHECKSUMS = "checksums.json"
FILES = ("lora.safetensors", "ema.safetensors", "optimizer.pt", "state.json")
OLD = "old.safetensors"  # optional: DiffusionNFT's old-policy weights (payload key "old")
SHARDS = "shards"  # a sharded checkpoint's torch.distributed.checkpoint directory
SHARDED_FILES = ("state.json", f"{SHARDS}/.metadata")
STATE_KEYS = ("epoch", "optimizer_steps", "nonfinite_in_row")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, incomplete or inconsistent. The message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(root: Path) -> list[str]:
    """Remove the temporary files and directories (``.tmp-*``, ``.old-*``, ``.latest-*``) that a writer killed
    mid-save left behind; those of a live process are kept. Returns the names removed."""
    removed = []
    if not Path(root).is_dir():
        return removed
    for p in Path(root).iterdir():
        if not p.name.startswith((".tmp-", ".old-", ".latest-")):
            continue
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, epoch: int, payload: dict) -> Path:
    """payload: {"lora": {name: tensor}, "ema": {name: tensor}, "optimizer": state_dict, "state": json-able}, and
    optionally "old": {name: tensor} (DiffusionNFT)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    clean_stale_temporaries(root)
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in payload["lora"].items()}, str(tmp / "lora.safetensors"))
        save_file({k: v.contiguous() for k, v in payload["ema"].items()}, str(tmp / "ema.safetensors"))
        torch.save(payload["optimizer"], tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(payload["state"]))
        files = FILES
        if "old" in payload:
            save_file({k: v.contiguous() for k, v in payload["old"].items()}, str(tmp / OLD))
            files = FILES + (OLD,)
        _commit(tmp, final, files)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint is intact") from None
    return final


def _commit(tmp: Path, final: Path, files) -> None:
    """Checksums of ``files``, ``COMPLETE``, fsync, the atomic rename of ``tmp`` to ``final``, ``latest``."""
    root = final.parent
    (tmp / CHECKSUMS).write_text(json.dumps({name: _sha256(tmp / name) for name in files}, indent=1))
    (tmp / COMPLETE).write_text("ok\n")
    for f in tmp.rglob("*"):
        if f.is_file():
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
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")


def save_sharded_checkpoint(run_dir: Path, epoch: int, sharded: dict, state: dict) -> Path:
    """Collective (every process calls it): ``sharded`` = {"lora": {name: DTensor}, "ema": {...}, "optimizer": the
    optimizer's sharded state dict, optionally "old"} written by every process into ``shards/``; ``state`` (JSON) by
    the main process, which then checksums every file and renames the directory into place."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    final = root / f"epoch_{epoch:06d}"
    main = tdist.get_rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(root)
    holder = [str(root / f".tmp-{final.name}-{os.getpid()}")]
    tdist.broadcast_object_list(holder, src=0)  # every process writes into the main process's temporary directory
    tmp = Path(holder[0])
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    tdist.barrier()
    dcp.save(sharded, checkpoint_id=str(tmp / SHARDS))
    tdist.barrier()
    if main:
        try:
            (tmp / "state.json").write_text(json.dumps(state))
            files = ["state.json"] + sorted(str(f.relative_to(tmp)) for f in (tmp / SHARDS).rglob("*") if f.is_file())
            _commit(tmp, final, files)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint is "
                          f"intact") from None
    tdist.barrier()
    return final


def is_sharded(path: Path) -> bool:
    return (Path(path) / SHARDS).is_dir()


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint directories, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("epoch_*") if p.is_dir() and is_complete(p))


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (by directory scan: ``latest`` may lag after a crash between the rename and
    its update)."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def sync_latest(run_dir: Path) -> None:
    """Make ``checkpoints/latest`` name the newest complete checkpoint (or remove it when there is none)."""
    root = Path(run_dir) / "checkpoints"
    newest = find_latest_checkpoint(run_dir)
    pointer = root / "latest"
    if newest is None:
        pointer.unlink(missing_ok=True) if root.is_dir() else None
        return
    if not pointer.is_file() or pointer.read_text().strip() != newest.name:
        tmp = root / f".latest-{os.getpid()}"
        tmp.write_text(newest.name + "\n")
        os.replace(tmp, pointer)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user means by ``path``: a checkpoint directory, the ``latest`` pointer file, a run's
    ``checkpoints/`` directory or the run directory itself (the last three give the newest complete checkpoint)."""
    path = Path(path)
    if path.is_file() and path.name == "latest":
        found = find_latest_checkpoint(path.parent.parent)
        path = found if found is not None else path.parent / path.read_text().strip()
    elif path.is_dir() and not is_complete(path):
        run_dir = path.parent if path.name == "checkpoints" else path
        found = find_latest_checkpoint(run_dir)
        if found is not None:
            path = found
    if not is_complete(path):
        what = "does not exist" if not path.exists() else "is not a complete checkpoint (nor a run directory with one)"
        raise FileNotFoundError(f"{path} {what}")
    return path


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the file when a file is missing or its SHA-256 differs from the one
    recorded at save time."""
    path = Path(path)
    required = SHARDED_FILES if is_sharded(path) else FILES
    for name in required + (CHECKSUMS,):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing from the checkpoint")
    sums_file = path / CHECKSUMS
    try:
        sums = json.loads(sums_file.read_text())
        if not isinstance(sums, dict) or not all(isinstance(sums.get(n), str) for n in required):
            raise ValueError
        if not all(isinstance(n, str) and isinstance(v, str) and ".." not in Path(n).parts for n, v in sums.items()):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{sums_file}: not a valid checksum list") from None
    for name in sums:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing from the checkpoint")
        if _sha256(path / name) != sums[name]:
            raise CheckpointError(f"{path / name}: checksum mismatch (the file is corrupt)")


def _check_state(state, file: Path) -> dict:
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object with {', '.join(STATE_KEYS)}")
    for key in STATE_KEYS:
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{file}: {key} must be an integer >= 0, got {value!r}")
    return state


def load_checkpoint(path: Path) -> dict:
    """Verify and load a checkpoint; any problem is a :class:`CheckpointError` naming the file."""
    path = resolve_checkpoint(path)
    verify_checkpoint(path)
    if is_sharded(path):
        out = consolidate_shards(path)
        out["state"] = read_state(path)
        return out
    out = {}
    for key, name in (("lora", "lora.safetensors"), ("ema", "ema.safetensors"), ("old", OLD)):
        if key == "old" and not (path / name).is_file():
            continue
        try:
            out[key] = load_file(str(path / name))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / name}: not a readable safetensors file ({e})") from None
    try:
        out["optimizer"] = torch.load(path / "optimizer.pt", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, IndexError, KeyError,
            AttributeError, TypeError) as e:
        raise CheckpointError(f"{path / 'optimizer.pt'}: not a readable optimizer state "
                              f"({type(e).__name__})") from None
    if not isinstance(out["optimizer"], dict):
        raise CheckpointError(f"{path / 'optimizer.pt'}: not an optimizer state dict")
    out["state"] = read_state(path)
    return out


def check_trained_tensors(path: Path, tensors: dict, params: dict) -> None:
    """A checkpoint's trained tensors must be exactly this run's trainable parameters, with their shapes."""
    trained = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trained:
        raise CheckpointError(f"{path}: its {len(tensors)} trained tensors are not this run's {len(trained)} "
                              f"(another model, training.lora_rank, lora_target_modules or full_finetune?)")
    for name, value in tensors.items():
        if value.shape != params[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, this run's has "
                                  f"{tuple(params[name].shape)} (another training.lora_rank?)")


def read_state(path: Path) -> dict:
    """A checkpoint's validated ``state.json``."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path / 'state.json'}: not valid JSON") from None
    return _check_state(state, path / "state.json")


def consolidate_shards(path: Path) -> dict:
    """A sharded checkpoint's full tensors, in one process: {"lora": {name: tensor}, "ema": {...}[, "old": {...}]}
    (the optimizer state is left out: it only serves a sharded resume)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        try:
            dcp_to_torch_save(str(Path(path) / SHARDS), str(Path(tmp) / "full.pt"))
            full = torch.load(Path(tmp) / "full.pt", weights_only=True)
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError, KeyError) as e:
            raise CheckpointError(f"{Path(path) / SHARDS}: not a readable sharded checkpoint "
                                  f"({type(e).__name__})") from None
    if not isinstance(full, dict) or not isinstance(full.get("lora"), dict) or not isinstance(full.get("ema"), dict):
        raise CheckpointError(f"{Path(path) / SHARDS}: holds no trained weights and EMA")
    return {k: {n: t.contiguous() for n, t in full[k].items()} for k in ("lora", "ema", "old") if k in full}


def consolidate_checkpoint(path: str | Path, out: str | Path, *, use_ema: bool = True) -> Path:
    """Write a checkpoint's trained weights (their EMA by default) as one safetensors file of full tensors named as
    the transformer's parameters: for a full fine-tuning run, ``transformer.load_state_dict(load_file(out))``."""
    path = resolve_checkpoint(path)
    ck = load_checkpoint(path)
    names = list(ck["lora"])
    if use_ema:
        weights = {n: ck["ema"][f"shadow.{i}"] for i, n in enumerate(names)}
    else:
        weights = ck["lora"]
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp), metadata={"checkpoint": str(path)})
    os.replace(tmp, out)
    return out
