"""Reading a bundle's inference config and resolving its references without running it.

MONAI's own :class:`monai.bundle.ConfigParser` resolves the ``@`` references (and relative ids)
with ``instantiate=False, eval_expr=False``: nothing is constructed, no ``$`` expression is
evaluated, no import statement runs. What is left is plain data in which every ``$`` expression
still standing is an :class:`Expression` (its config key and text), so the translation can name
exactly the key that would need code to run.

Two forms are handled before parsing, both without evaluating anything:

* ``"$@name"`` (an expression that is only a reference) is the reference ``"@name"``.
* ``%`` macros (text copied from another config file) are refused: MONAI reads them from a path
  relative to the working folder, which a bundle must not choose.

With ``trust=True`` (``--trust-bundle-code``) the expressions a translation needs, and only those,
are evaluated by the same parser (after the config's ``imports``), each announced first.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volseg.bundles.source import Bundle, BundleError, read_text, shown_path

#: Bounds on a config's structure (the Model Zoo's largest has about 2,000 nodes).
MAX_NODES = 200_000
MAX_DEPTH = 64
_PURE_REFERENCE = re.compile(r"^\$\s*@([A-Za-z0-9_#]+)\s*$")


@dataclass(frozen=True)
class Expression:
    """A ``$`` expression left unevaluated: where it is (MONAI id, ``#``-separated) and its text."""

    key: str
    text: str


def load_config_file(path: Path) -> dict[str, Any]:
    """A config file (JSON or YAML, safe loader) as a dict, with bounded size and structure."""
    text = read_text(path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json/yaml errors of any kind: the file is not a config
        raise BundleError(f"{shown_path(path)} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{shown_path(path)} does not hold a mapping of config keys")
    _check_structure(data, shown_path(path))
    return data


def _check_structure(data: Any, source: str) -> None:
    """Refuse configs that are too deep or too large (YAML aliases can multiply a small file)."""
    count = 0
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise BundleError(f"{source} is too large or too deeply nested to be a bundle config")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _prepare(node: Any, key: str) -> Any:
    """``$@ref`` -> ``@ref``; refuse ``%`` macros (see the module's docstring)."""
    if isinstance(node, dict):
        return {k: _prepare(v, f"{key}#{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_prepare(v, f"{key}#{i}" if key else str(i)) for i, v in enumerate(node)]
    if isinstance(node, str):
        m = _PURE_REFERENCE.match(node)
        if m:
            return "@" + m.group(1)
        if node.startswith("%"):
            raise BundleError(f"config key {key!r} copies text from another file ({node!r})",
                              hint="volseg reads no file a bundle names by a % macro; replace it by the value "
                              "it refers to")
    return node


class BundleConfig:
    """A bundle's inference config, resolved by MONAI's parser without running anything."""

    def __init__(self, bundle: Bundle, trust: bool = False) -> None:
        from monai.bundle import ConfigParser

        self.bundle = bundle
        self.path = bundle.inference_config()
        self.trust = trust
        raw = _prepare(load_config_file(self.path), "")
        raw["bundle_root"] = str(bundle.root)  # as `monai.bundle run` sets it
        self.raw = raw
        self.parser = ConfigParser(copy.deepcopy(raw))

    @property
    def source(self) -> str:
        return self.bundle.where(f"configs/{self.path.name}")

    def has(self, key: str) -> bool:
        try:
            self.parser[key]
            return True
        except (KeyError, IndexError, TypeError, ValueError):
            return False

    def resolved(self, key: str) -> Any:
        """``key``'s content with references resolved: plain data, :class:`Expression` where code would run."""
        try:
            item = self.parser.get_parsed_content(key, instantiate=False, eval_expr=False)
        except (KeyError, ValueError) as exc:
            raise BundleError(f"{self.source}: cannot resolve config key {key!r}: {exc}",
                              hint="the bundle's config refers to a key it does not define") from None
        except Exception as exc:  # noqa: BLE001  (a hostile config must not end in a traceback)
            raise BundleError(f"{self.source}: cannot resolve config key {key!r}: {type(exc).__name__}",
                              hint="this config is not one MONAI's bundle parser can read") from None
        return self._plain(item, key)

    def _plain(self, node: Any, key: str) -> Any:
        from monai.bundle import ConfigExpression, ConfigItem

        if isinstance(node, ConfigExpression):
            where = node.get_id() or key
            return Expression(where, self.original_text(where, str(node.get_config())))
        if isinstance(node, ConfigItem):
            return self._plain(node.get_config(), node.get_id() or key)
        if isinstance(node, dict):
            return {k: self._plain(v, f"{key}#{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [self._plain(v, f"{key}#{i}") for i, v in enumerate(node)]
        return node

    def original_text(self, key: str, default: str) -> str:
        """The text at ``key`` as the bundle wrote it (MONAI's parser rewrites references inside expressions)."""
        node: Any = self.raw
        for part in key.replace("::", "#").split("#"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return default
        return node if isinstance(node, str) else default

    def instantiate(self, key: str) -> Any:
        """Build ``key`` (a network) with MONAI's parser, the bundle's root importable as its
        ``scripts`` package (only with ``--trust-bundle-code``)."""
        if not self.trust:
            raise RuntimeError("bundle code is run only when trusted")
        from monai.bundle import ConfigParser

        parser = ConfigParser(copy.deepcopy(self.raw))
        with bundle_imports(self.bundle.root):
            try:
                return parser.get_parsed_content(key)
            except Exception as exc:  # the bundle's own code failed: say where
                cause = exc.__cause__ or exc
                raise BundleError(f"{self.source}: building {key!r} with the bundle's code failed: "
                                  f"{type(cause).__name__}: {cause}") from None

    def evaluate(self, expr: Expression) -> Any:
        """Evaluate one expression with MONAI's parser (only with ``--trust-bundle-code``)."""
        if not self.trust:
            raise RuntimeError("bundle code is evaluated only when trusted")
        from monai.bundle import ConfigParser

        parser = ConfigParser(copy.deepcopy(self.raw))
        try:
            return parser.get_parsed_content(expr.key, instantiate=False)
        except Exception as exc:  # the bundle's own code failed: say where
            raise BundleError(f"{self.source}: evaluating {expr.key!r} ({expr.text}) failed: "
                              f"{type(exc).__name__}: {exc}") from None


def _is_scripts(name: str) -> bool:
    return name == "scripts" or name.startswith("scripts.")


@contextlib.contextmanager
def bundle_imports(root: Path):
    """``import scripts...`` finds the bundle's ``scripts/`` (and only while the block runs):
    ``root`` first on ``sys.path``, any other ``scripts`` package set aside and put back after."""
    saved = {k: m for k, m in sys.modules.items() if _is_scripts(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))
        for k in [k for k in sys.modules if _is_scripts(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def scripts_files(root: Path) -> list[str]:
    """The Python files under the bundle's ``scripts/`` (relative paths; links not followed)."""
    base = root / "scripts"
    if base.is_symlink() or not base.is_dir():
        return []
    found = []
    for folder, _dirs, files in os.walk(base, followlinks=False):
        found += [str((Path(folder) / f).relative_to(root)) for f in files if f.endswith(".py")]
    return sorted(found)


def expressions_in(node: Any) -> list[Expression]:
    """Every :class:`Expression` in resolved data, in order."""
    found: list[Expression] = []
    stack = [node]
    while stack:
        n = stack.pop(0)
        if isinstance(n, Expression):
            found.append(n)
        elif isinstance(n, dict):
            stack.extend(n.values())
        elif isinstance(n, (list, tuple)):
            stack.extend(n)
    return found
