"""Which Slicer the module runs in: refuse one older than 5.10 with a message that says what to do.

Imported by ``VolSegSlicer.py`` before anything else of the library, so this file (and the
package's ``__init__``) keep to syntax that Python 3.6 parses: an older Slicer reads it and
shows the message instead of a traceback from code written for Python 3.10+.
"""

import sys

#: The oldest Slicer the module supports, and the Python it ships (the engine needs 3.10+).
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 10)
DOWNLOAD_URL = "https://download.slicer.org"
PROJECT_URL = "https://github.com/volsegslicer/VolSegSlicer"


def parse_version(text):
    """``"5.8.1"`` -> ``(5, 8)``; None when ``text`` does not start with two numbers."""
    parts = str(text or "").strip().split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x")
    except (IndexError, ValueError):
        return None


def refusal(slicer_version, python_version=None):
    """The message to show when this Slicer is too old for the module, else None.

    Args:
        slicer_version: Slicer's version text (``slicer.app.applicationVersion``, e.g. ``"5.8.1"``).
        python_version: ``sys.version_info`` of Slicer's Python (default: this one).
    """
    python_version = tuple(python_version or sys.version_info)[:3]
    version = parse_version(slicer_version)
    too_old = version is not None and version < MINIMUM_SLICER
    python_too_old = python_version[:2] < MINIMUM_PYTHON
    if not too_old and not python_too_old:
        return None
    found = "3D Slicer {} with Python {}".format(slicer_version or "(unknown version)",
                                                 ".".join(str(n) for n in python_version))
    return ("VolSegSlicer needs 3D Slicer {}.{} or newer (Python {}.{}+); this is {}, so the module was not "
            "loaded. Install the current 3D Slicer from {}, then add the VolSegSlicer folder to its "
            "module paths again (see {}).".format(MINIMUM_SLICER[0], MINIMUM_SLICER[1], MINIMUM_PYTHON[0],
                                                  MINIMUM_PYTHON[1], found, DOWNLOAD_URL, PROJECT_URL))


def announce_refusal(slicer_module, message):
    """Say ``message`` where a user sees it: in Slicer's log now, and in an error dialog once
    Slicer has finished starting (module files are read before the main window exists)."""
    import logging

    logging.error(message)

    def show():
        slicer_module.util.errorDisplay(message, windowTitle="VolSegSlicer")

    announce_refusal.shown = show  # kept alive for the signal, and reachable by tests
    try:
        slicer_module.app.connect("startupCompleted()", show)
    except Exception:  # noqa: BLE001 - no application (a script): the log line is the message
        pass
