"""What a bundle's run would execute of the bundle's own code, found without executing any of it.

``volseg bundle-code BUNDLE --json`` answers with :func:`code_report`: whether the bundle runs
without ``--trust-bundle-code`` (its translation needs no code), and if not, every piece of the
bundle's code a trusted run may execute, in the form the trusted run announces each before it runs
it (``key: text``, ``network_def#_target_: ... (built by MONAI's bundle parser)``,
``importable: scripts/...``), plus the bundle's import statements, which MONAI's parser runs as
soon as it evaluates anything. The list is found by reading the config (MONAI's parser with
nothing evaluated): it holds every expression of the sections volseg translates and of the keys
they refer to, so what a trusted run announces is always in it (it may hold more: an expression
of a step volseg does not need). The ``digest`` (:func:`volseg.bundles.source.bundle_digest`)
binds a decision to these configs and scripts: ``--bundle-sha256`` refuses a bundle edited since.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from volseg.bundles.source import Bundle, BundleError, bundle_digest, open_bundle

#: The config sections volseg translates (:mod:`volseg.bundles.translate`).
SECTIONS = ("network_def", "preprocessing", "inferer", "postprocessing")


def _line(key: str, text: str) -> str:
    return f"{key.replace('::', '#')}: {' '.join(text.split())}"


def needs_trust(error: BundleError) -> bool:
    """Whether ``error`` is a refusal that ``--trust-bundle-code`` would lift (its hint says so)."""
    return "--trust-bundle-code" in (error.hint or "")


def code_on_trust(bundle: Bundle) -> list[str]:
    """Every piece of ``bundle``'s code a run with ``--trust-bundle-code`` may execute (see the module)."""
    from monai.bundle import ConfigExpression

    from volseg.bundles.config import BundleConfig, scripts_files
    from volseg.bundles.reading import NETWORKS, SectionReader, _short_target

    config = BundleConfig(bundle, trust=False)
    reader = SectionReader(config)
    lines: list[str] = []

    def add(line: str) -> None:
        if line not in lines:
            lines.append(line)

    resolver = config.parser.ref_resolver  # MONAI evaluates every import statement before anything else
    config.parser.parse()
    for key, item in resolver.items.items():
        if isinstance(item, ConfigExpression) and item.is_import_statement(item.get_config()):
            add(_line(key, config.original_text(key, str(item.get_config()))))
    for section in SECTIONS:
        if not config.has(section):
            continue
        node = config.resolved(section)
        if section == "network_def" and isinstance(node, dict) and "_target_" in node:
            target = node["_target_"]
            text = str(getattr(target, "text", target))
            module = text.rsplit(".", 1)[0] if "." in text else ""
            custom = not isinstance(target, str) or (module and not module.startswith("monai.networks.nets"))
            if custom or _short_target(target) not in NETWORKS:  # built by MONAI's parser, with the bundle's code
                add(f"network_def#_target_: {text} (built by MONAI's bundle parser)")
                for expr in reader.expressions_reached(node):
                    add(_line(expr.key, expr.text))
                files = scripts_files(bundle.root)
                if files:
                    add("importable: " + ", ".join(files))
                continue
        for expr in reader.expressions_reached(node):
            add(_line(expr.key, expr.text))
    return lines


def code_report(path: str | Path) -> dict[str, Any]:
    """``{"bundle", "digest", "needs_trust", "code": [...], "refusal"}`` for the bundle at ``path``.

    ``needs_trust`` is true when the bundle's translation is refused only for want of
    ``--trust-bundle-code`` (``refusal`` is that message); ``code`` then lists what a trusted run
    may execute. A bundle refused for another reason raises that :class:`BundleError`.
    """
    origin = Path(path).expanduser()
    try:
        if stat.S_ISLNK(os.lstat(origin).st_mode):
            raise BundleError(f"{origin} is a symbolic link", hint="give the bundle's own folder or .zip, not a link to it")
    except FileNotFoundError:
        pass  # open_bundle says so
    bundle = open_bundle(origin)
    digest = bundle_digest(bundle)
    report: dict[str, Any] = {"bundle": str(origin), "digest": digest, "needs_trust": False, "code": [],
                              "refusal": None}
    from volseg.bundles.translate import translate  # torch and MONAI: only for a bundle that opened

    try:
        translate(bundle)
    except BundleError as error:
        if not needs_trust(error):
            raise
        report.update(needs_trust=True, code=code_on_trust(bundle), refusal=error.message)
    return report
