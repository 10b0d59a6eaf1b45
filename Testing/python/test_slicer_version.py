"""A Slicer older than 5.10 gets a clear message at module load, not a traceback."""

from __future__ import annotations

import ast
import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "VolSegSlicer" / "VolSegSlicer.py"
sys.path.insert(0, str(REPO / "VolSegSlicer"))

from VolSegSlicerLib.slicer_version import refusal  # noqa: E402

# What Slicer does with a module file: import it. ``slicer`` is a stand-in for the old
# application (its version, the startupCompleted signal and the error dialog).
LOAD = r"""
import json, runpy, sys, types
calls = {"connected": [], "dialogs": []}
slicer = types.ModuleType("slicer")
slicer.app = types.SimpleNamespace(applicationVersion=sys.argv[2],
                                   connect=lambda signal, slot: calls["connected"].append((signal, slot)))
slicer.util = types.SimpleNamespace(errorDisplay=lambda text, **kw: calls["dialogs"].append(text))
sys.modules["slicer"] = slicer
try:
    runpy.run_path(sys.argv[1])
except ImportError as exc:
    error = str(exc)
else:
    error = None
for signal, slot in calls["connected"]:
    slot()  # Slicer has started
print(json.dumps({"error": error, "signals": [s for s, _ in calls["connected"]], "dialogs": calls["dialogs"],
                  "python": list(sys.version_info[:2])}))
"""


def _python39() -> str:
    """A Python 3.9 (what Slicer 5.8 ships) where the machine has one, else this Python."""
    candidates = sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / "3.9*" / "bin" / "python3.9")))
    candidates += [shutil.which("python3.9")] if shutil.which("python3.9") else []
    for candidate in candidates:  # a pyenv shim exists even where it cannot run
        if subprocess.run([candidate, "-c", "pass"], capture_output=True, timeout=60).returncode == 0:
            return candidate
    return sys.executable


def test_refusal_names_both_versions_and_what_to_do():
    message = refusal("5.8.1", (3, 9, 10))
    assert "needs 3D Slicer 5.10 or newer" in message and "3D Slicer 5.8.1 with Python 3.9.10" in message
    assert "https://download.slicer.org" in message and "https://github.com/volsegslicer/VolSegSlicer" in message
    assert refusal("5.10.0", (3, 12, 1)) is None and refusal("5.11.0-2026-01-02", (3, 12, 1)) is None
    assert refusal("6.0.0", (3, 13, 0)) is None
    assert "Python 3.9" in refusal("5.10.0", (3, 9, 0))  # a Slicer built against an old Python
    assert refusal("", (3, 12, 0)) is None  # unknown version: not refused on a guess


def test_an_old_slicer_gets_the_message_in_the_log_and_a_dialog_not_a_traceback():
    python = _python39()
    done = subprocess.run([python, "-c", LOAD, str(MODULE), "5.8.1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = refusal("5.8.1", tuple(result["python"]) + (0,)).split(" with Python")[0]
    assert result["error"] and result["error"].startswith(expected)
    assert result["signals"] == ["startupCompleted()"] and result["dialogs"] == [result["error"]]
    assert result["error"] in done.stderr  # logged too
    assert "Traceback" not in done.stderr


def test_the_check_comes_before_anything_written_for_new_python():
    """The module file and the check parse as Python 3.9, and the check runs before any other
    import of the library or of typing's newer names."""
    for path in (MODULE, REPO / "VolSegSlicer" / "VolSegSlicerLib" / "__init__.py",
                 REPO / "VolSegSlicer" / "VolSegSlicerLib" / "slicer_version.py"):
        ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    order = [(node.lineno, ast.unparse(node)) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.If))]
    check = next(n for n, text in order if text.startswith("if _TOO_OLD"))
    before = [text for n, text in order if n < check]
    assert before == ["import logging", "import os", "import sys", "import slicer", "if MODULE_DIR not in sys.path:\n    sys.path.insert(0, MODULE_DIR)",
                      "from VolSegSlicerLib.slicer_version import announce_refusal, refusal"], before
