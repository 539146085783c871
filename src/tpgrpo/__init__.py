"""tpgrpo: online RL for flow-matching text-to-image models (TP-GRPO and the GRPO family).

The Python API is the CLI's engine::

    from tpgrpo import Trainer, load_config

    cfg = load_config("configs/default.yaml", ["training.epochs=2", "run_dir=runs/api"])
    summary = Trainer(cfg).train()          # {"eval_before": {...}, "eval_after": {...}, "epoch": 2, ...}

``Config`` builds a configuration in code (``Config(algorithm="flow_grpo", training={"epochs": 2})``);
``build_reward`` gives any scorer by name or import path. Heavy modules load on first use.
"""

__version__ = "0.1.0"

__all__ = ["Config", "Trainer", "build_reward", "load_config", "__version__"]


def __getattr__(name: str):
    if name in ("Config", "load_config"):
        from . import config

        return getattr(config, name)
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name == "build_reward":
        from .rewards import build_reward

        return build_reward
    raise AttributeError(f"module 'tpgrpo' has no attribute {name!r}")
