"""Model adapters behind one protocol (see base.py)."""

from .base import FlowModel, PromptEmbeds


def load_model(model_cfg) -> FlowModel:
    """Build the configured model (``model.kind``) from ``model.path`` (None: the built-in weights)."""
    if model_cfg.kind == "shapes":
        from .toy import ShapesModel

        return ShapesModel.load(model_cfg.path)
    raise ValueError(f"model.kind: unknown model kind {model_cfg.kind!r}")


__all__ = ["FlowModel", "PromptEmbeds", "load_model"]
