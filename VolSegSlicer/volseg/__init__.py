"""volseg: the VolSegSlicer engine.

A Slicer-independent package for AI segmentation of CT and MRI volumes. The path of a
volume through it is: read (:mod:`volseg.io`), preprocess (:mod:`volseg.preprocessing.card_steps`),
infer (:mod:`volseg.inference.sliding_window`), postprocess (:mod:`volseg.postprocessing.labels`), write
(:mod:`volseg.io`). :mod:`volseg.pipeline` ties the steps together and
:mod:`volseg.cli.main` is the command line.
"""

__version__ = "0.1.0"

from volseg.errors import VolSegError  # noqa: E402

__all__ = ["VolSegError", "__version__"]
