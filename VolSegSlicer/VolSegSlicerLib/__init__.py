"""Pure-Python pieces of the VolSegSlicer Slicer module.

Nothing here imports slicer, qt, ctk or vtk, so everything can be tested with pytest outside
Slicer: the engine's JSON progress protocol (:mod:`.protocol`), the background process with its
tree kill (:mod:`.process`), command lines (:mod:`.command`), the model list and input matching
(:mod:`.catalog`), device choices (:mod:`.devices`) and resources/requirements (:mod:`.resources`).
"""
