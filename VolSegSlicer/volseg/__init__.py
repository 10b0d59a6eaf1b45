"""volseg: the VolSegSlicer engine.

A Slicer-independent package for AI segmentation of CT and MRI volumes. The path of a
volume through it is: read (:mod:`volseg.io`), preprocess (:mod:`volseg.preprocess`),
infer (:mod:`volseg.inference`), postprocess (:mod:`volseg.postprocess`), write
(:mod:`volseg.io`). :mod:`volseg.pipeline` ties the steps together and
:mod:`volseg.cli` is the command line.
"""

__version__ = "0.1.0"

from volseg.errors import VolSegError  # noqa: E402

__all__ = ["VolSegError", "__version__"]
