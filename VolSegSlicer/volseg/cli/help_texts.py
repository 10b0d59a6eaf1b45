"""The longer help texts of the ``volseg`` command line (``volseg COMMAND --help``).

Kept apart from :mod:`volseg.cli.parser` so the parser reads as a list of options. The serve protocol
written here is what :func:`volseg.cli.serve.cmd_serve` implements; ``Testing/python/test_startup.py``
checks that the help pages carry these texts.
"""

CARDS_DIR_HELP = ("extra folder of model cards (*.json), searched before $VOLSEG_CARDS_PATH and the built-in "
                  "cards; a card there shadows a built-in one with the same id (repeatable)")
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (default auto: the GPU with the most free memory, else MPS, else CPU)"
PROGRESS_HELP = ("bar: human output on stderr; json: one JSON event per line on stdout (stage, progress, log, "
                 "then a final done or error); none: only warnings, errors and the final line")

SEGMENT_EXAMPLES = """examples:
  volseg segment CT.nrrd --model uxnet-flare --checkpoint best_metric_model.pth -o CT.seg.nrrd
  volseg segment FLAIR.nii.gz T1.nii.gz T1gd.nii.gz T2.nii.gz --model segformer3d-brats \\
         --checkpoint pytorch_model.bin -o tumour.nii.gz --probabilities tumour-prob.nrrd
  volseg segment CT.nrrd --arch unet --num-labels 3 --checkpoint model.pt -o out.nrrd   # no card
  volseg segment CT_dicom_folder/ --model uxnet-amos -c amos.pth -o seg.dcm --device cuda:1
  volseg segment CT.nii.gz --model my-card.json -o CT.seg.nrrd --roi-size 128 128 64 --no-flips

The output's extension picks the format; a label map (.nii.gz, .nrrd, ...) gets a Slicer colour
table <name>.csv beside it. Nothing is replaced without --overwrite. Exit codes: 0 done, 2 bad
input, 3 missing resources (memory, device), 130 cancelled, 1 internal error."""

SERVE_DESCRIPTION = """Warm worker, as the Slicer module runs it: the model stays loaded between requests.

Protocol. Each stdin line is one JSON object:
  {"id": ID, "args": [SEGMENT ARGUMENTS]}   a segment run; args as for `volseg segment`
                                           (without "segment" and --progress)
  {"cancel": ID}                           cancel that request: the running one stops between
                                           windows, a queued one is skipped
  {"cancel": true}                         cancel whatever runs now
Requests run one at a time, in order. Each answer is the JSON event stream of
`volseg segment --progress json`, every event tagged with "request": ID, ending with one
"done" or "error" event per request (a request cancelled before it started gets one error
event, exit_code 130). stdout holds nothing but these events; a bad line gets an error event
and the worker goes on. The worker exits (status 0) when stdin closes, after the queued requests.

Example session (> sent, < received; recorded with the demo card, long events shortened):
  > {"id": 1, "args": ["CTChest4.nrrd", "--model", "demo", "-o", "CT.seg.nrrd"]}
  < {"event": "log", "level": "info", "message": "device cpu: CUDA not available: ...", "request": 1}
  < {"event": "log", "level": "warning", "message": "model 'demo' is a demonstration model: ...", "request": 1}
  < {"event": "stage", "stage": "read", "message": "reading 1 input(s)", "request": 1}
  < ... stages load_model, preprocess, infer ...
  < {"event": "progress", "stage": "infer", "fraction": 0.5, "done": 1, "total": 2, ..., "request": 1}
  < ... progress, stages postprocess, write ...
  < {"event": "done", "outputs": {"segmentation": "CT.seg.nrrd", "probabilities": null},
     "elapsed_s": 6.3, "startup_s": 0.0, "timings": {...}, ..., "request": 1}
  > {"id": 2, "args": ["CTChest4.nrrd", "--model", "demo", "-o", "CT.seg.nrrd"]}
  < {"event": "error", "message": "output CT.seg.nrrd exists; pass --overwrite to replace it",
     "hint": "or choose another output path", "exit_code": 2, "request": 2}
  > {"id": 3, "args": ["CTChest4.nrrd", "--model", "demo", "-o", "CT2.seg.nrrd"]}
  > {"cancel": 3}
  < {"event": "error", "message": "cancelled before it started; nothing was written", "hint": null,
     "exit_code": 130, "request": 3}"""
