"""The VolSegSlicer module's own code, tested with pytest outside Slicer.

Work on MRML is written against the scene and logics it is given (:class:`.mrml.MRMLContext`):
Slicer passes its own, the tests pass slicer-core's. The path of a run: :mod:`.runner` writes the
inputs and starts the engine (:mod:`.process`, :mod:`.command`, :mod:`.protocol`, :mod:`.jobs`),
:mod:`.results` imports its label map as segments (re-runs: :mod:`.replace`), :mod:`.export` and
:mod:`.dicom` write what the user corrected. :mod:`.catalog`, :mod:`.devices`, :mod:`.panel`,
:mod:`.settings` and :mod:`.resources` decide what the panel shows and installs, without Qt;
:mod:`.testing` holds the user's chain as checks, run by pytest and by the in-Slicer self-test.
Nothing here imports qt, ctk or the Slicer application.
"""
