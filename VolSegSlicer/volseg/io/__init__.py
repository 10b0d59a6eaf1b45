"""Reading volumes and writing results on exactly the input grid.

Public API::

    Volume, Source                      # volseg.io.volume
    read_volume, read_inputs            # volseg.io.readers
    write_segmentation, write_probabilities, write_volume   # volseg.io.writers
    atomic_output, atomic_outputs, check_writable, check_not_an_input   # volseg.io.atomic
"""

from volseg.io.atomic import (
    atomic_output,
    atomic_outputs,
    check_not_an_input,
    check_writable,
    commit_file,
    full_suffix,
    make_output_folder,
)
from volseg.io.readers import count_nonfinite, read_inputs, read_volume
from volseg.io.volume import Source, Volume
from volseg.io.writers import (
    PROBABILITY_SUFFIXES,
    SEGMENTATION_SUFFIXES,
    VOLUME_SUFFIXES,
    check_segmentation_output,
    color_table_path,
    segmentation_outputs,
    write_color_table,
    write_probabilities,
    write_segmentation,
    write_volume,
)

__all__ = [
    "PROBABILITY_SUFFIXES",
    "SEGMENTATION_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Source",
    "Volume",
    "atomic_output",
    "atomic_outputs",
    "check_not_an_input",
    "check_segmentation_output",
    "check_writable",
    "commit_file",
    "color_table_path",
    "count_nonfinite",
    "full_suffix",
    "make_output_folder",
    "read_inputs",
    "read_volume",
    "segmentation_outputs",
    "write_color_table",
    "write_probabilities",
    "write_segmentation",
    "write_volume",
]
