"""The ``volseg`` argument parser: every command's options and help."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from volseg import __version__
from volseg.cli.server import add_remote_options, add_server_parser
from volseg.cli.help_texts import CARDS_DIR_HELP, DEVICE_HELP, PROGRESS_HELP, SEGMENT_EXAMPLES, SERVE_DESCRIPTION


#: The longest ``--arch-config`` JSON read (real ones are a few hundred characters).
MAX_ARCH_CONFIG_CHARS = 64 * 1024


def json_object(text: str) -> dict:
    """``--arch-config``: a JSON object, parsed with bounds (length, nesting, digits) so that a
    hostile value is one clear argument error -- never a RecursionError that ends the worker."""
    if len(text) > MAX_ARCH_CONFIG_CHARS:
        raise argparse.ArgumentTypeError(f"longer than {MAX_ARCH_CONFIG_CHARS:,} characters")
    try:
        value = json.loads(text)
    except RecursionError:
        raise argparse.ArgumentTypeError("JSON nested too deeply") from None
    except ValueError as exc:  # not JSON, or an integer of thousands of digits
        raise argparse.ArgumentTypeError(f"not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object ({...})")
    return value


def add_segment_options(p: argparse.ArgumentParser, probabilities: bool = True) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="input volume(s): NIfTI, NRRD, MHA/MHD or a DICOM folder; one per channel")
    model = p.add_argument_group("model")
    model.add_argument("--model", "-m", help="model card id (see `volseg models`) or path to a card .json")
    model.add_argument("--arch", help="architecture for a checkpoint without a card (with --num-labels)")
    model.add_argument("--num-labels", type=int, help="number of foreground labels, with --arch")
    model.add_argument("--arch-config", type=json_object, default=None, metavar="JSON",
                       help="constructor arguments for --arch as JSON, e.g. '{\"feat_size\": [48,96,192,384]}'")
    model.add_argument("--bundle", type=Path, metavar="BUNDLE",
                       help="a MONAI bundle folder or .zip: its inference config translated into a card")
    model.add_argument("--trust-bundle-code", action="store_true",
                       help="with --bundle: evaluate the bundle's Python expressions (listed before they run); "
                       "use only for bundles you trust")
    model.add_argument("--bundle-sha256", metavar="DIGEST",
                       help="with --trust-bundle-code: run the bundle only if its configs and scripts are still the "
                       "ones trusted (the digest `volseg bundle-code BUNDLE --json` printed)")
    model.add_argument("--activation", choices=("softmax", "sigmoid"),
                       help="output activation for --arch, when the weights cannot tell (SegFormer3D): softmax "
                       "(a background channel plus one per label) or sigmoid (one channel per label)")
    model.add_argument("--checkpoint", "-c", type=Path, help="weights file (overrides the card's)")
    model.add_argument("--cards-dir", action="append", default=[], metavar="FOLDER", help=CARDS_DIR_HELP)
    model.add_argument("--trust-pickle", action="store_true",
                       help="allow full unpickling of the checkpoint: this can run code, use only for files you trust")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, required=True,
                     help="result: .seg.nrrd, .nii/.nii.gz/.nrrd/.mha label map, or .dcm DICOM SEG (DICOM input)")
    if probabilities:
        out.add_argument("--probabilities", type=Path, metavar="FILE",
                         help="also write the class probabilities, one channel per output of the network, named "
                         "in the file (.nii.gz or .nrrd; see the README for opening it in Slicer)")
    out.add_argument("--overwrite", action="store_true", help="replace existing output files")
    run = p.add_argument_group("inference")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    run.add_argument("--roi-size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="sliding-window size")
    run.add_argument("--overlap", type=float, help="window overlap, 0 <= overlap < 1")
    run.add_argument("--sw-batch-size", type=int, help="windows per forward pass")
    run.add_argument("--flips", action=argparse.BooleanOptionalAction, default=None, help="test-time flips from the card")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision on GPU (--no-amp: the same as --precision fp32)")
    run.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default=None,
                     help="on a CUDA GPU: auto (the card's default: fp16 autocast, which kept the labels where bf16 "
                     "changed up to 0.5 %%), fp32 (true float32, TF32 off), fp16 or bf16 autocast; the CPU runs fp32")
    post = p.add_argument_group("postprocessing")
    post.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the largest connected component of each label")
    post.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None, help="fill enclosed holes")
    post.add_argument("--min-island-mm3", type=float, help="remove islands smaller than this volume")


BATCH_DESCRIPTION = """Segment many cases with one model, loaded once. Each path is:
  a volume file or a DICOM series folder   one case (single-input models)
  any other folder, single-input model     one case per volume file in it (sorted by name)
                                           and per DICOM series sub-folder
  any other folder, multi-input model      one case: the folder holds one file per input,
                                           matched by the card's name hints
Results go to OUT_DIR/<case name><format>. A failed case is reported and the others go on
(exit code 1 at the end). OUT_DIR/volseg-manifest.jsonl records every case (status, result
files, timings, device, error): a re-run skips the cases done with the same model, checkpoint,
options and inputs, redoes those made with other settings, and leaves other existing files
alone unless --overwrite. Ctrl-C keeps the finished cases; run again to do the rest.
--cluster local|auto|ray://HOST:PORT spreads the cases over Ray workers (pip install
"volseg[cluster]"); inputs and OUT_DIR must then be on a file system every node sees."""


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="volseg", description="AI segmentation of CT and MRI volumes.",
                                     epilog="`volseg COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"volseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment a volume", formatter_class=raw,
                         description="Segment one case: one input file (or DICOM folder) per model input.",
                         epilog=SEGMENT_EXAMPLES)
    add_segment_options(seg)
    seg.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help=PROGRESS_HELP)
    add_remote_options(seg)

    mod = sub.add_parser("models", help="list the model cards")
    mod.add_argument("--json", action="store_true",
                     help='print {"models": [card summaries], "problems": [invalid card files]} as JSON '
                     "(what the Slicer panel reads)")
    mod.add_argument("--cards-dir", action="append", default=[], metavar="FOLDER", help=CARDS_DIR_HELP)
    mod.add_argument("--architectures", action="store_true", help="list the registered architectures instead")
    add_remote_options(mod)
    mod.add_argument("--bundle", type=Path, metavar="BUNDLE",
                     help="describe one MONAI bundle (folder or .zip): what it expects, its labels, what is missing")

    bc = sub.add_parser("bundle-card", help="translate a MONAI bundle into a model card file",
                        description="Translate a MONAI bundle's inference config and metadata into a volseg model "
                        "card (JSON) to keep, edit and share. Nothing of the bundle's code runs unless "
                        "--trust-bundle-code.")
    bc.add_argument("bundle", type=Path, help="the bundle's folder or .zip")
    bc.add_argument("-o", "--output", type=Path, required=True, help="the card file to write (.json)")
    bc.add_argument("--trust-bundle-code", action="store_true",
                    help="evaluate the bundle's Python expressions the card needs (listed first)")
    bc.add_argument("--overwrite", action="store_true", help="replace an existing card file")

    bcode = sub.add_parser("bundle-code", help="which of a MONAI bundle's own code a trusted run would run",
                           description="Say whether a MONAI bundle runs without --trust-bundle-code and, if it does "
                           "not, list every piece of its own code (expressions, import statements, scripts/ files) a "
                           "run with --trust-bundle-code may execute. Nothing of it runs.")
    bcode.add_argument("bundle", type=Path, help="the bundle's folder or .zip")
    bcode.add_argument("--json", action="store_true",
                       help='print {"bundle", "digest", "needs_trust", "code": [...], "refusal"} as JSON '
                       "(what the Slicer panel reads)")

    ins = sub.add_parser("inspect", help="what a checkpoint holds and which architecture it fits")
    ins.add_argument("checkpoint", type=Path, help="weights file (.pt/.pth/.bin/.ckpt/.model/.safetensors) or folder")
    ins.add_argument("--json", action="store_true",
                     help="print format, wrapper keys, stripped prefixes, tensor and parameter counts and the "
                     "fitting architectures (with their configuration) as JSON")
    ins.add_argument("--trust-pickle", action="store_true",
                     help="allow a full unpickle for files that store Python objects: this can run code, "
                     "use only for files you trust")

    dev = sub.add_parser("devices", help="list compute devices and what auto picks")
    dev.add_argument("--json", action="store_true", help='print {"devices": [...], "auto": ID, "reason": TEXT} as JSON')

    demo = sub.add_parser("demo", help="segment the bundled chest CT with the demonstration model",
                          description="Segment slicerio's chest CT with the bundled demonstration model (not a "
                          "medical model) and write CTChest4-demo.seg.nrrd and a PNG of a few slices.")
    demo.add_argument("-o", "--output-dir", type=Path, default=None, help="folder for the results (default: a new ./volseg-demo*)")
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    demo.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help=PROGRESS_HELP)
    demo.add_argument("--overwrite", action="store_true", help="replace the demo results already in the -o folder")

    batch = sub.add_parser("batch", help="segment many cases with one model (loaded once)",
                           formatter_class=raw, description=BATCH_DESCRIPTION)
    add_segment_options(batch, probabilities=False)
    for action in batch._actions:  # -o is a folder here
        if action.dest == "output":
            action.help, action.metavar = "folder for the results (created if missing)", "OUT_DIR"
        elif action.dest == "inputs":
            action.help = "cases: volume files, DICOM series folders, folders of volumes or case folders (see above)"
    batch.add_argument("--format", default=".seg.nrrd", choices=(".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"),
                       help="result format (default .seg.nrrd)")
    batch.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help=PROGRESS_HELP)
    spread = batch.add_argument_group("cluster (Ray)")
    spread.add_argument("--cluster", metavar="local|auto|ray://HOST:PORT",
                        help="run the cases on Ray workers: local starts Ray on this machine, auto joins the "
                        "cluster this machine belongs to")
    spread.add_argument("--workers", type=int, help="Ray workers, each holding the model (default: one per GPU, "
                        "else as many as the CPUs allow)")
    spread.add_argument("--retries", type=int, default=2,
                        help="times a case is tried again when its worker dies (default 2)")

    sub.add_parser("serve", help="warm worker: one JSON request per stdin line, JSON events on stdout",
                   formatter_class=raw, description=SERVE_DESCRIPTION)
    add_server_parser(sub)
    return parser
