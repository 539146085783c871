"""Experiment trackers through accelerate (``logging.trackers``): tensorboard (default, ``RUN_DIR/tensorboard``) and
Weights & Biases (``wandb``; project ``logging.project``, run name ``logging.run_name``, files in ``RUN_DIR/wandb``).
Every scalar of an epoch's record is logged at step = epoch, evaluation grids go to wandb as images, and the
resolved configuration is the run's config. Nothing here needs a network connection unless wandb is asked to go
online (``logging.wandb_mode``, else the ``WANDB_MODE`` environment variable, else wandb's own default)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": [2, 3]}`` → ``{"a/b": 1, "c/0": 2, "c/1": 3}`` (lists of numbers only)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, (int, float)):
                    out[f"{key}/{i}"] = x
        else:
            out[key] = v
    return out


def start_trackers(cfg, run_dir: Path):
    """An ``accelerate.Accelerator`` holding the configured trackers, started, with the run's configuration stored
    (tensorboard: the flat scalars as hparams; wandb: the nested resolved config)."""
    from accelerate import Accelerator
    from accelerate.tracking import TensorBoardTracker

    log = cfg.logging
    trackers = []
    if "tensorboard" in log.trackers:
        trackers.append(TensorBoardTracker("tensorboard", str(run_dir)))
    if "wandb" in log.trackers:
        try:
            from accelerate.tracking import WandBTracker
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("logging.trackers: wandb is not installed (pip install wandb)") from None
        kwargs = {"name": log.run_name or Path(run_dir).name, "dir": str(run_dir)}
        if log.wandb_mode is not None:
            kwargs["mode"] = log.wandb_mode
        trackers.append(WandBTracker(log.project, **kwargs))
    if not trackers:
        return None
    import torch

    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers, project_dir=str(run_dir))
    acc.init_trackers(log.project)
    resolved = cfg.model_dump()
    for t in acc.trackers:
        if t.name == "tensorboard":
            t.store_init_configuration({k: v for k, v in flatten(resolved).items()
                                        if isinstance(v, (int, float, str, bool))})
        else:
            t.store_init_configuration(resolved)
    return acc


def log_record(acc, record: dict) -> None:
    """Every finite scalar of an epoch's metrics record, at step = epoch."""
    values = {k: v for k, v in flatten(record).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "epoch"}
    acc.log(values, step=record["epoch"])


def log_grid(acc, grid_png: Path, epoch: int) -> None:
    """An evaluation grid as an image (wandb only: tensorboard keeps to scalars; the PNG is in RUN_DIR/eval)."""
    from PIL import Image

    for t in acc.trackers:
        if t.name == "wandb":
            with Image.open(grid_png) as im:
                t.log_images({"eval/grid": [np.asarray(im.convert("RGB"))]}, step=epoch)


def finish(acc, *, keep_process_group: bool) -> None:
    if keep_process_group:  # end_training() would also tear down the process group
        for t in acc.trackers:
            t.finish()
    else:
        acc.end_training()
