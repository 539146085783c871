"""tpgrpo: online RL for flow-matching text-to-image models (TP-GRPO and the GRPO family)."""

__version__ = "0.1.0"
