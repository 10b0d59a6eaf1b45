"""Reading volumes and writing results on exactly the input grid.

Public API::

    Volume, Source                      # volseg.io.volume
    read_volume, read_inputs            # volseg.io.readers
    write_segmentation, write_probabilities, write_volume   # volseg.io.writers
    check_segmentation_output, segmentation_outputs, color_table_path   # volseg.io.outputs
    atomic_output, atomic_outputs, check_writable, check_not_an_input   # volseg.io.atomic

Each name is imported from its module on first use, so that the light modules (``atomic``,
``outputs``) can be used without importing SimpleITK, which the command line's argument checks
rely on to answer at once.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "volseg.io.atomic": ("atomic_output", "atomic_outputs", "check_not_an_input", "check_writable", "commit_file",
                         "full_suffix", "make_output_folder"),
    "volseg.io.outputs": ("PROBABILITY_SUFFIXES", "SEGMENTATION_SUFFIXES", "VOLUME_SUFFIXES",
                          "check_segmentation_output", "color_table_path", "segmentation_outputs"),
    "volseg.io.readers": ("count_nonfinite", "read_inputs", "read_volume"),
    "volseg.io.volume": ("Source", "Volume"),
    "volseg.io.writers": ("write_color_table", "write_probabilities", "write_segmentation", "write_volume"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'volseg.io' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
