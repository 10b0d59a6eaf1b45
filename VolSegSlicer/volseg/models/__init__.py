"""Networks by registered name.

>>> from volseg import models
>>> net = models.create("segformer3d", in_channels=4, num_classes=3)
>>> net = models.load("uxnet", torch.load("best_metric_model.pth", weights_only=True))

The names below come from :mod:`volseg.models.registry`, which imports PyTorch; they are
resolved on first use, so that ``volseg.models.builtin`` (architecture names without torch)
can be imported on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Architecture",
    "Match",
    "all_architectures",
    "check_network_size",
    "check_state_dict",
    "compare_keys",
    "create",
    "get",
    "implied_config",
    "implied_out_channels",
    "load",
    "match",
    "names",
    "parameter_count",
    "register",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("volseg.models.registry"), name)
    raise AttributeError(f"module 'volseg.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
