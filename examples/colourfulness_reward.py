"""Your own reward, in a file of your own: train the built-in model to draw more saturated colours.

    tpgrpo train --config configs/default.yaml reward.name=examples/colourfulness_reward.py:Colourfulness \\
        reward.options='{examples/colourfulness_reward.py:Colourfulness: {background: 245}}' \\
        training.epochs=10 run_dir=runs/colourful

``reward.name`` is an import path — ``package.module:attr`` (importable from the working directory or installed) or
``path/to/file.py:attr``. The attribute is either a scorer (an object with a ``primary`` score name and
``__call__(images, prompts, metadata=None)``) or, as here, a factory (a class or function) that is called with the
reward's options (``reward.options[NAME]``) and returns one. The same path works for
``tpgrpo serve-reward --reward examples/colourfulness_reward.py:Colourfulness``.

The protocol is the built-in scorers' (``tpgrpo.rewards.RewardFunction``): ``images`` is a uint8 array
``[N, H, W, 3]``, ``prompts`` a list of N strings, ``metadata`` None or N dicts; return a dict of per-image float
arrays of length N, the ``primary`` one included. Raise on failure — never return 0 for a failed score.
"""

from __future__ import annotations

import numpy as np

from tpgrpo.rewards import check_batch


class Colourfulness:
    primary = "colourfulness"

    def __init__(self, background: int = 245):
        if not 0 <= int(background) <= 255:
            raise ValueError(f"colourfulness: background must be in [0, 255], got {background}")
        self.background = int(background)

    def __call__(self, images, prompts, metadata=None):
        arr = check_batch(self.primary, images, prompts, metadata).astype(np.float64)
        saturation = arr.max(axis=-1) - arr.min(axis=-1)          # 0 for grey and white, up to 255
        drawn = arr.min(axis=-1) < self.background                 # pixels that are not background
        share = drawn.mean(axis=(1, 2))
        return {self.primary: saturation.mean(axis=(1, 2)) / 255.0, "drawn_share": share}
