"""Networks by registered name.

>>> from volseg import models
>>> net = models.create("segformer3d", in_channels=4, num_classes=3)
>>> net = models.load("uxnet", torch.load("best_metric_model.pth", weights_only=True))
"""

from volseg.models.registry import (
    Architecture,
    Match,
    all_architectures,
    check_state_dict,
    compare_keys,
    create,
    get,
    implied_config,
    load,
    match,
    names,
    register,
)

__all__ = [
    "Architecture",
    "Match",
    "all_architectures",
    "check_state_dict",
    "compare_keys",
    "create",
    "get",
    "implied_config",
    "load",
    "match",
    "names",
    "register",
]
