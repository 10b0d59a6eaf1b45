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


#: Constructor arguments of a built-in family that its weights cannot show but that change what it
#: computes. ``None``: there is no safe default, so a card (or ``--arch-config``) must state it and
#: volseg refuses to guess; a text: the default used when it is not stated, and why that one.
HIDDEN_SETTINGS: dict[str, dict[str, str | None]] = {
    "segformer3d": {
        "num_heads": None,  # any head count fits the same weights (qkv is C x C): [1, 2, 5, 8] published
        "attn_scale": "'num_heads' (1/sqrt(num_heads), the math of the code the official weights were released with)",
        "patch_stride": "[4, 2, 2, 2] (the published strides)",
    },
}

#: Built-in families trained with either output activation (the official SegFormer3D with
#: sigmoid, others -- volseg's demonstration model -- with softmax): the weights cannot say
#: which, so a run without a card must be told (``--activation``).
EITHER_ACTIVATION: frozenset[str] = frozenset({"segformer3d"})


def hidden_settings(name: str) -> dict[str, str | None]:
    """The settings of architecture ``name`` that its weights cannot show (see :data:`HIDDEN_SETTINGS`);
    a registered plug-in's come from its ``Architecture.hidden_settings``."""
    key = name.lower()
    if key in HIDDEN_SETTINGS or key in BUILTIN_MODULES:
        return dict(HIDDEN_SETTINGS.get(key, {}))
    registry = sys.modules.get("volseg.models.registry")
    if registry is not None:
        try:
            return dict(registry.get(key).hidden_settings)
        except Exception:  # an unknown name: nothing known about it
            return {}
    return {}


def unstated_settings(name: str, config: dict) -> list[str]:
    """The settings of ``name`` without a safe default that ``config`` does not state."""
    return [k for k, default in hidden_settings(name).items() if default is None and k not in config]


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
