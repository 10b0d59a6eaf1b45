"""The built-in architecture names, known without importing PyTorch.

Reading and validating model cards (``volseg models``, the Slicer panel's list) needs the
architecture names and each family's output kind, but not the networks: this module holds
those facts so that the card code never imports torch. :mod:`volseg.models.registry` imports
each family's module from :data:`BUILTIN_MODULES` on first use.
"""

from __future__ import annotations

import sys

#: Registry name -> module that defines ``ARCHITECTURES`` (a list of ``Architecture``).
BUILTIN_MODULES: dict[str, str] = {
    "uxnet": "volseg.models.uxnet",
    "repuxnet": "volseg.models.repuxnet",
    "deformuxnet": "volseg.models.deformuxnet",
    "segformer3d": "volseg.models.segformer3d",
    "mednext": "volseg.models.mednext",
    "swinunetr": "volseg.models.monai_nets",
    "unetr": "volseg.models.monai_nets",
    "segresnet": "volseg.models.monai_nets",
    "dynunet": "volseg.models.monai_nets",
    "unet": "volseg.models.monai_nets",
}

#: Built-in families whose outputs are independent sigmoid channels (no background channel);
#: every other built-in family is softmax. Must agree with each ``Architecture.output_kind``.
SIGMOID_FAMILIES: frozenset[str] = frozenset({"segformer3d"})


def known_names() -> list[str]:
    """The built-in architecture names plus any plug-in already registered.

    A plug-in can only have registered if the registry (and so torch) was imported, so this
    never imports torch itself.
    """
    registry = sys.modules.get("volseg.models.registry")
    if registry is not None:
        return registry.names()
    return sorted(BUILTIN_MODULES)


def output_kind(name: str) -> str | None:
    """``"softmax"`` or ``"sigmoid"`` for a built-in architecture; None for any other name (a
    plug-in's kind is in its registered ``Architecture``)."""
    key = name.lower()
    if key not in BUILTIN_MODULES:
        return None
    return "sigmoid" if key in SIGMOID_FAMILIES else "softmax"
