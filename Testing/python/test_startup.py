"""The first seconds of every command: answers that need no network come before PyTorch.

Importing torch and MONAI takes seconds; listing the cards (what the Slicer panel runs to fill
its list), inspecting a file that is not a checkpoint and refusing a bad argument must not pay
for it. These tests run the command line in a fresh interpreter and check that torch, MONAI
and SimpleITK were never imported, and that each refusal is one clear message. How fast the
answers are is measured by ``bench/bench_startup.py``, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from volseg.cli.parser import build_parser

HEAVY = ("torch", "monai", "SimpleITK", "nibabel", "scipy")

#: Runs ``main(argv)`` for each argv given as JSON on the command line, in one fresh interpreter,
#: and prints one JSON line per run: exit code, stderr, stdout size and the heavy modules loaded.
PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from volseg.cli.main import main
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code
        heavy = sorted(m for m in HEAVY if m in sys.modules)
        print(json.dumps({"argv": argv, "rc": rc, "err": err.getvalue(), "out": out.getvalue(), "heavy": heavy}))
""").replace("HEAVY", repr(HEAVY))


def probe(*argvs: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(argvs))], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """A file that exists where an input is expected (never read: every case is refused first)."""
    path = tmp_path_factory.mktemp("in") / "ct.nrrd"
    path.write_bytes(b"NRRD0004\n")
    return path


def test_models_json_needs_neither_torch_nor_monai():
    (run,) = probe(["models", "--json"])
    assert run["rc"] == 0 and run["heavy"] == [], run
    cards = json.loads(run["out"])["models"]
    assert {"demo", "uxnet-flare", "mednext-nnunet-kits19-template"} <= {c["id"] for c in cards}


def test_models_lists_weights_for_every_card(ct):
    (run,) = probe(["models"])
    blocks: dict[str, list[str]] = {}
    for line in run["out"].splitlines():
        if line and not line.startswith(" "):
            blocks[line] = []
        elif line:
            blocks[list(blocks)[-1]].append(line.strip())
    assert len(blocks) >= 10
    for card, lines in blocks.items():  # one weights (or bundled checkpoint) line per card
        assert sum(line.startswith(("weights:", "checkpoint:")) for line in lines) == 1, (card, lines)
    assert any(line.startswith("weights: not published") for line in blocks["mednext-nnunet-kits19-template"])
    # the checkpoint notes (which file of a download, how to make one) are shown where a user looks
    notes = {card: next((line for line in lines if line.startswith("notes: ")), "") for card, lines in blocks.items()}
    assert "pytorch_model.bin" in notes["segformer3d-brats"]
    assert "nnUNet_train" in notes["mednext-nnunet-kits19-template"]  # its weights line says "see the notes"
    (listed,) = probe(["models", "--json"])
    by_id = {c["id"]: c for c in json.loads(listed["out"])["models"]}
    assert "pytorch_model.bin" in by_id["segformer3d-brats"]["checkpoint"]["notes"]
    (needs,) = probe(["segment", str(ct), "--model", "mednext-nnunet-kits19-template", "-o", "x.seg.nrrd",
                      "--progress", "none"])
    assert needs["rc"] == 2 and "the card's notes: No published weights" in needs["err"]


def test_unknown_runtime_is_refused_before_any_work(ct, tmp_path):
    """VOLSEG_RUNTIME=bogus: an input error (exit 2) before torch, not an internal error after preprocessing."""
    code = PROBE.replace("import contextlib", "import os; os.environ['VOLSEG_RUNTIME'] = 'bogus'\nimport contextlib")
    argvs = [["segment", str(ct), "--model", "demo", "-o", str(tmp_path / "o.seg.nrrd"), "--progress", "none"],
             ["batch", str(ct), "--model", "demo", "-o", str(tmp_path / "b"), "--progress", "none"]]
    r = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, timeout=120)
    for run in map(json.loads, r.stdout.splitlines()):
        assert run["rc"] == 2 and "VOLSEG_RUNTIME='bogus' is not a CPU runtime" in run["err"], run
        assert "onnxruntime, openvino" in run["err"] and "bug" not in run["err"] and run["heavy"] == []
    assert len(r.stdout.splitlines()) == 2 and not (tmp_path / "b").exists()


def test_argument_errors_are_answered_before_torch_is_imported(ct, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    existing = tmp_path / "done.seg.nrrd"
    existing.write_bytes(b"earlier result")
    out = str(tmp_path / "out.seg.nrrd")
    empty = tmp_path / "no-cases"
    empty.mkdir()
    named_jpg = tmp_path / "ct.jpg"  # a NRRD: answered from its first bytes, before torch and ITK
    named_jpg.write_bytes(ct.read_bytes())
    photo = tmp_path / "photo.png"  # the start of a PNG: signature and IHDR (2x1, colour type 2 = RGB)
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
                      + bytes([8, 2, 0, 0, 0]) + b"\x00" * 20)
    cases = {
        "unknown model 'dem'": ["segment", str(ct), "--model", "dem", "-o", out],
        "did you mean demo": ["segment", str(ct), "--model", "dem", "-o", out],
        "does not exist": ["segment", str(tmp_path / "missing.nrrd"), "--model", "demo", "-o", out],
        "unknown extension '.png'": ["segment", str(ct), "--model", "demo", "-o", str(tmp_path / "x.png")],
        "exists; pass --overwrite": ["segment", str(ct), "--model", "demo", "-o", str(existing)],
        "is not a PyTorch checkpoint: it is a text file": ["segment", str(ct), "--model", "demo", "--checkpoint", str(text),
                                                   "-o", out],
        "unknown device 'gpu'": ["segment", str(ct), "--model", "demo", "--device", "gpu", "-o", out],
        "unknown device 'cuda:x'": ["segment", str(ct), "--model", "demo", "--device", "cuda:x", "-o", out],
        "unknown architecture 'segformr3d'": ["segment", str(ct), "--arch", "segformr3d", "--num-labels", "3",
                                              "-o", out],
        "takes 1 input channel": ["segment", str(ct), str(ct), "--model", "demo", "-o", out],
        "DICOM SEG (.dcm) output needs a DICOM series input (a folder), but the input is ct.nrrd":
            ["segment", str(ct), "--model", "demo", "-o", str(tmp_path / "seg.dcm")],
        "needs a checkpoint": ["segment", str(ct), "--model", "uxnet-flare", "-o", out],
        "--overlap 1.5": ["segment", str(ct), "--model", "demo", "--overlap", "1.5", "-o", out],
        "segformer3d's num_heads cannot be read from the weights": ["segment", str(ct), "--arch", "segformer3d",
                                                                    "--num-labels", "7", "-o", out],
        "the output activation cannot be read from the weights": [
            "segment", str(ct), "--arch", "segformer3d", "--num-labels", "7", "--arch-config", '{"num_heads": [1, 2, 2, 4]}',
            "-o", out],
        "ct.jpg holds a NRRD volume but its name ends in '.jpg': the extension is the problem":
            ["segment", str(named_jpg), "--model", "demo", "-o", out],
        "photo.png is a PNG picture (2x1, RGB colour): a colour photo": ["segment", str(photo), "--model", "demo",
                                                                         "-o", out],
        "notes.txt is not a PyTorch checkpoint": ["inspect", str(text)],
        "batch: not a PyTorch checkpoint": ["batch", str(ct), "--model", "demo", "--checkpoint", str(text),
                                    "-o", str(tmp_path / "b")],
        "batch: output folder": ["batch", str(ct), "--model", "demo", "-o", str(existing)],
        "batch: names a file, but batch writes one result per case into a folder":
            ["batch", str(ct), "--model", "demo", "-o", str(tmp_path / "result.seg.nrrd")],
        "batch: holds no volume file": ["batch", str(empty), "--model", "demo", "-o", str(tmp_path / "b")],
        "batch: missing.nrrd does not exist": ["batch", str(ct), str(tmp_path / "missing.nrrd"), "--model", "demo",
                                               "-o", str(tmp_path / "b")],
    }
    runs = probe(*[[*argv, "--progress", "none"] if argv[0] != "inspect" else argv for argv in cases.values()])
    for (needle, _), run in zip(cases.items(), runs):
        needle = needle.removeprefix("batch: ")
        assert run["rc"] == 2, run
        assert needle in run["err"], (needle, run["err"])
        assert "Traceback" not in run["err"] and "internal error" not in run["err"]
        assert run["heavy"] == [], (needle, run["heavy"])
    assert not (tmp_path / "b").exists() and existing.read_bytes() == b"earlier result"
    assert not (tmp_path / "result.seg.nrrd").exists()


def test_a_good_command_still_gets_torch():
    """The guard above is meaningful: the probe does see torch when a command needs it."""
    (run,) = probe(["models", "--architectures", "--json"])
    assert run["rc"] == 0 and "torch" in run["heavy"]


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in subparsers.items() for action in sub._actions
               if not action.help and action.dest != "help"]
    assert missing == []


def test_help_pages_say_what_users_asked_for(capsys):
    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        return capsys.readouterr().out

    assert "--probabilities" not in help_of("batch")
    segment = help_of("segment")
    assert "examples:" in segment and "volseg segment CT.nrrd --model" in segment and "--probabilities" in segment
    serve = " ".join(help_of("serve").split())
    for needle in ('{"id": ID, "args": [SEGMENT ARGUMENTS]}', '{"cancel": ID}', '"request": ID',
                   "Example session", "exit_code"):
        assert needle in serve, needle
    assert "what the Slicer panel reads" in " ".join(help_of("models").split())
    demo = " ".join(help_of("demo").split())
    assert "--device" in demo and "auto | cpu" in demo and "json: one JSON event per line" in demo


def test_engine_modules_for_the_fast_path_do_not_import_heavy_packages():
    """The modules the argument checks use import nothing heavy at module level."""
    code = ("import sys, volseg.request, volseg.cards, volseg.io.outputs, volseg.checkpoints.sniffing, "
            "volseg.models.builtin, volseg.progress, volseg.cli.main; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_builtin_output_kinds_agree_with_the_registry():
    from volseg.models import builtin, registry

    for name in builtin.BUILTIN_MODULES:
        assert builtin.output_kind(name) == registry.get(name).output_kind, name
    assert builtin.output_kind("my-plugin") is None
    assert builtin.known_names() == registry.names()


def test_the_final_line_says_how_long_start_up_took():
    import io

    from volseg.progress import JsonReporter, TextReporter

    text = TextReporter(io.StringIO())
    text.start -= 2.0  # the run began 2 s before its first stage (imports, device choice)
    text.stage("read")
    text.done({"segmentation": "s.seg.nrrd"})
    line = text.stream.getvalue().splitlines()[-1]
    assert line.startswith("wrote s.seg.nrrd in 2.0s (start-up 2.0s, read 0.0s)"), line
    events = JsonReporter(io.StringIO())
    events.start -= 1.5
    events.stage("read")
    events.done({})
    done = json.loads(events.stream.getvalue().splitlines()[-1])
    assert done["startup_s"] == pytest.approx(1.5, abs=0.05) and set(done["timings"]) == {"read"}
    events.begin_run()  # the next case of a batch starts from zero
    events.stage("read")
    events.done({})
    assert json.loads(events.stream.getvalue().splitlines()[-1])["startup_s"] < 0.5


def test_models_and_refusals_work_before_torch_is_installed(tmp_path):
    """The Slicer panel lists the models before the PyTorch extension has installed torch."""
    code = ("import sys\n"
            "for name in ('torch', 'monai', 'SimpleITK'): sys.modules[name] = None  # import fails, as if absent\n"
            "from volseg.cli.main import main\n"
            "assert main(['models', '--json']) == 0\n"
            f"assert main(['segment', {str(tmp_path / 'missing.nrrd')!r}, '--model', 'demo', '-o', 'x.seg.nrrd',"
            " '--progress', 'none']) == 2\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"id": "demo"' in r.stdout and "missing.nrrd does not exist" in r.stderr
