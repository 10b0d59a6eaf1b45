"""Trusting a MONAI bundle's own code from the panel (pure Python, no Slicer, no Qt).

A bundle whose translation the engine refuses only for want of ``--trust-bundle-code`` (its
network is its own ``scripts/``, or its config computes a value with a Python expression) runs
from the panel only after the user has seen that code and said Trust:

1. the engine is asked what would run: ``volseg bundle-code BUNDLE --json``
   (:func:`code_query_args`, :func:`parse_code_report`): the list of expressions, import
   statements and ``scripts/`` files, and the digest of the bundle's configs and scripts;
2. the panel shows :func:`trust_question` (the engine's list, as it is) with Trust / Cancel;
3. :meth:`TrustStore.record` remembers the answer for that bundle's path *and* digest, in the
   module's application settings (one value, replaced whole);
4. every run asks :func:`trust_decision`: a bundle trusted at its current digest runs with
   ``--bundle PATH --trust-bundle-code --bundle-sha256 DIGEST`` (the engine checks the digest
   again), one that needs no trust runs as any card; one refused (Cancel), or edited since
   (another digest), or never asked, is asked about again, and the runner starts nothing for it.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Callable, Optional

from volseg.bundles.source import BundleError, bundle_digest, open_bundle

__all__ = ["BundleError", "CodeReport", "NeedsTrust", "TrustDecision", "TrustStore", "bundle_path",
           "code_query_args", "current_digest", "list_title", "parse_code_report", "trust_decision", "trust_question"]

#: The application settings key (under ``VolSegSlicer/``) holding the decisions, as JSON text.
SETTINGS_KEY = "TrustedBundles"
#: The dialog's title and the words around the engine's list.
QUESTION_TITLE = "Trust this bundle's code?"
QUESTION_TEXT = "This bundle runs its own Python code:"
QUESTION_ADVICE = "Run it only if you trust its source."
#: The suffix the model list shows for a bundle that needs trust and has none.
NEEDS_TRUST_LABEL = "needs trust"
#: Decisions kept at most (the oldest are forgotten first).
MAX_DECISIONS = 500


class NeedsTrust(ValueError):
    """A run of a bundle that may not run its own code: nothing was started."""


@dataclass(frozen=True)
class CodeReport:
    """The engine's answer to ``volseg bundle-code BUNDLE --json``."""

    bundle: str
    digest: str
    needs_trust: bool
    code: tuple[str, ...]
    refusal: str = ""


def code_query_args(path: str) -> list[str]:
    """The engine arguments asking which of the bundle's code a trusted run would run."""
    return ["bundle-code", str(path), "--json"]


def parse_code_report(text: str) -> CodeReport:
    """The engine's JSON answer (raises ValueError if it is not one)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("'volseg bundle-code --json' did not print an object")
    code = data.get("code")
    if (not isinstance(data.get("bundle"), str) or not isinstance(data.get("digest"), str)
            or not str(data["digest"]).startswith("sha256:") or not isinstance(data.get("needs_trust"), bool)
            or not isinstance(code, list) or not all(isinstance(c, str) for c in code)):
        raise ValueError("'volseg bundle-code --json' printed an unexpected answer")
    if data["needs_trust"] and not code:
        raise ValueError("the engine says the bundle needs trust but lists no code")
    return CodeReport(data["bundle"], data["digest"], data["needs_trust"], tuple(code), str(data.get("refusal") or ""))


def trust_question(report: CodeReport) -> str:
    """The confirmation text: the engine's list of code, one piece a line, as the engine wrote it."""
    lines = [QUESTION_TEXT, ""] + [f"  {line}" for line in report.code] + ["", QUESTION_ADVICE]
    return "\n".join(lines)


def bundle_key(path: str) -> str:
    """The path a decision is remembered under: the bundle's folder (or zip) in the real path of the
    folder holding it, so that two spellings of one place are one key (the bundle itself must not be
    a link: :func:`check_bundle_path`)."""
    absolute = os.path.abspath(os.path.expanduser(str(path)))
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def check_bundle_path(path: str) -> None:
    """Refuse a bundle path that is a symbolic link (as the model list does) or is not there."""
    try:
        st = os.lstat(os.path.expanduser(str(path)))
    except OSError as exc:
        raise BundleError(f"bundle {path} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{path} is a symbolic link", hint="give the bundle's own folder or .zip, not a link to it")


def current_digest(path: str) -> str:
    """The digest of the bundle's configs and scripts now (the engine's :func:`bundle_digest`)."""
    check_bundle_path(path)
    return bundle_digest(open_bundle(path))


def bundle_path(model: dict) -> Optional[str]:
    """The folder (or zip) of a model that is a MONAI bundle (``volseg models --json``), else None."""
    bundle = model.get("bundle") if isinstance(model, dict) else None
    path = bundle.get("path") if isinstance(bundle, dict) else None
    return str(path) if path else None


class TrustStore:
    """The decisions, kept as one JSON value in the application settings.

    ``value(key, default)`` and ``set_value(key, value)`` read and write the module's settings
    (``VolSegSlicer/<key>`` in Slicer's QSettings); the whole map is written in one call, so a
    decision is either stored whole or not at all. Each entry: ``{"digest", "needs_trust",
    "trusted", "code"}`` under :func:`bundle_key`.
    """

    def __init__(self, value: Callable[[str, Any], Any], set_value: Callable[[str, Any], None]) -> None:
        self._value = value
        self._set_value = set_value

    def decisions(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._value(SETTINGS_KEY, "") or "{}")
        except (TypeError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)
                and isinstance(v.get("digest"), str) and isinstance(v.get("trusted"), bool)
                and isinstance(v.get("needs_trust"), bool)}

    def get(self, path: str) -> Optional[dict[str, Any]]:
        return self.decisions().get(bundle_key(path))

    def record(self, report: CodeReport, trusted: bool) -> None:
        """Remember the engine's report and the user's answer (``trusted`` only counts where trust is needed)."""
        decisions = self.decisions()
        key = bundle_key(report.bundle)
        decisions.pop(key, None)
        decisions[key] = {"digest": report.digest, "needs_trust": report.needs_trust,
                          "trusted": bool(trusted and report.needs_trust), "code": list(report.code)}
        while len(decisions) > MAX_DECISIONS:
            decisions.pop(next(iter(decisions)))
        self._set_value(SETTINGS_KEY, json.dumps(decisions))

    def forget(self, path: str) -> None:
        decisions = self.decisions()
        if decisions.pop(bundle_key(path), None) is not None:
            self._set_value(SETTINGS_KEY, json.dumps(decisions))

    def needs_trust_label(self, model: dict) -> str:
        """``"needs trust"`` for a bundle the user was asked about and did not trust, else ``""``."""
        path = bundle_path(model)
        entry = self.get(path) if path else None
        return NEEDS_TRUST_LABEL if entry and entry["needs_trust"] and not entry["trusted"] else ""


def list_title(title: str, model: dict, store: TrustStore) -> str:
    """The model list's line: ``title``, with ``(needs trust)`` for a bundle not trusted."""
    label = store.needs_trust_label(model)
    return f"{title} ({label})" if label else title


@dataclass(frozen=True)
class TrustDecision:
    """What a run of a model may do: ``run`` (``digest`` set: with the bundle's code trusted at
    that digest) or ``ask`` (the engine is asked about the bundle at ``path``; nothing runs yet)."""

    action: str
    path: str = ""
    digest: str = ""
    reason: str = ""


def trust_decision(model: dict, store: TrustStore) -> TrustDecision:
    """Whether ``model`` may run now, and how (see the module's docstring).

    Raises:
        BundleError: the bundle's path is a link, or the bundle cannot be read.
    """
    path = bundle_path(model)
    if path is None:
        return TrustDecision("run")
    digest = current_digest(path)
    entry = store.get(path)
    if entry is None:
        return TrustDecision("ask", path, reason="the bundle has not been checked for code of its own yet")
    if entry["digest"] != digest:
        return TrustDecision("ask", path, reason="the bundle's configs or scripts changed since it was checked")
    if not entry["needs_trust"]:
        return TrustDecision("run", path)
    if entry["trusted"]:
        return TrustDecision("run", path, digest)
    return TrustDecision("ask", path, reason="the bundle runs its own Python code, which you did not trust")


def run_arguments(decision: TrustDecision) -> dict[str, str]:
    """The :class:`~VolSegSlicerLib.command.SegmentOptions` fields a decision sets."""
    if decision.action != "run":
        raise NeedsTrust(f"{decision.path}: {decision.reason}; nothing was started. Click Segment in the "
                         "VolSegSlicer panel to see the bundle's code and decide whether to trust it.")
    return {"trusted_bundle_digest": decision.digest}
