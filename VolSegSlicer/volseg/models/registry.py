"""The architecture registry: build networks by name, load state dicts strictly.

An :class:`Architecture` couples a constructor that takes the *official* argument names with
an optional function that reads the constructor arguments implied by a state dict's own keys
and shapes. That is what lets ``load(name, state_dict)`` build the right variant of a network
(for example UX-Net's early 13^3 block, DeformUX-Net's 1x1x1 offset branch) without the user's
help, and what lets ``volseg inspect`` name the architecture a checkpoint fits.

Architectures are registered lazily: :data:`BUILTIN_MODULES` maps a name to the module that
defines it, and the module is imported on first use (so ``volseg models`` stays fast).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from volseg.errors import ArchitectureError, CheckpointError
from volseg.models import builtin

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Architecture:
    """A registered network family.

    Args:
        name: registry name, e.g. ``"uxnet"``.
        summary: one line for ``volseg models`` and ``volseg inspect``.
        build: constructor taking the official keyword arguments; returns an ``nn.Module``.
        config_from_state_dict: returns the constructor kwargs implied by a state dict's keys
            and shapes, or ``None`` when the state dict is not of this family.
        describe_variant: turns a config into a short variant description ("7^3 grouped MLP").
        prepare_state_dict: adapts an official state dict to this implementation's keys
            (for example dropping a key that only exists for gradient checkpointing). Must
            not mutate its argument.
        output_kind: ``"softmax"`` (mutually exclusive classes, argmax) or ``"sigmoid"``
            (independent channels, threshold) -- the default postprocessing for the family.
        hidden_settings: see the attribute.
    """

    name: str
    summary: str
    build: Callable[..., nn.Module]
    config_from_state_dict: Callable[[StateDict], dict[str, Any] | None] | None = None
    describe_variant: Callable[[dict[str, Any]], str] | None = None
    prepare_state_dict: Callable[[StateDict], dict[str, torch.Tensor]] | None = None
    output_kind: str = "softmax"
    aliases: tuple[str, ...] = field(default_factory=tuple)
    #: Constructor arguments the weights cannot show (name -> the default used, or None: must be
    #: stated); built-in families keep theirs in :data:`volseg.models.builtin.HIDDEN_SETTINGS`.
    hidden_settings: Mapping[str, str | None] = field(default_factory=dict)


#: Registry name -> module that defines ``ARCHITECTURES`` (see :mod:`volseg.models.builtin`).
BUILTIN_MODULES: dict[str, str] = dict(builtin.BUILTIN_MODULES)

_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add ``arch`` to the registry (also usable for user plug-ins)."""
    for key in (arch.name, *arch.aliases):
        _REGISTRY[key.lower()] = arch
    return arch


def _import_builtin(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for arch in getattr(module, "ARCHITECTURES", []):
        register(arch)


def names() -> list[str]:
    """All registered architecture names (built-in and registered plug-ins)."""
    return sorted(set(BUILTIN_MODULES) | {a.name for a in _REGISTRY.values()})


def get(name: str) -> Architecture:
    """Return the :class:`Architecture` registered as ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in _REGISTRY and key in BUILTIN_MODULES:
        _import_builtin(BUILTIN_MODULES[key])
    if key not in _REGISTRY:
        raise ArchitectureError(
            f"unknown architecture {name!r}",
            hint="choose one of: " + ", ".join(names()),
        )
    return _REGISTRY[key]


def all_architectures() -> list[Architecture]:
    """Every registered architecture, importing the built-in modules."""
    for module_name in sorted(set(BUILTIN_MODULES.values())):
        _import_builtin(module_name)
    seen: dict[str, Architecture] = {}
    for arch in _REGISTRY.values():
        seen.setdefault(arch.name, arch)
    return [seen[k] for k in sorted(seen)]


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the network registered as ``name`` with the official constructor's arguments.

    Example:
        >>> net = create("uxnet", in_chans=1, out_chans=5)
    """
    arch = get(name)
    try:
        inspect.signature(arch.build).bind(**kwargs)
    except TypeError as exc:
        raise ArchitectureError(
            f"invalid arguments for {arch.name}: {exc}",
            hint=f"{arch.name} accepts {_signature_text(arch.build)}",
        ) from None
    try:
        return arch.build(**kwargs)
    except (TypeError, ValueError, AssertionError, IndexError) as exc:
        raise ArchitectureError(
            f"cannot build {arch.name} with {kwargs}: {exc}",
            hint=f"{arch.name} accepts {_signature_text(arch.build)}",
        ) from None


def _signature_text(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(see its docstring)"


def implied_config(name: str, state_dict: StateDict) -> dict[str, Any]:
    """Constructor kwargs implied by ``state_dict`` for architecture ``name`` ({} if unknown)."""
    arch = get(name)
    sd = arch.prepare_state_dict(state_dict) if arch.prepare_state_dict else dict(state_dict)
    if arch.config_from_state_dict is None:
        return {}
    return arch.config_from_state_dict(sd) or {}


#: Constructor arguments that hold the number of output channels, across the families.
OUTPUT_COUNT_KEYS = ("out_chans", "out_channels", "num_classes", "n_classes")


def implied_out_channels(name: str, state_dict: StateDict) -> int | None:
    """The number of output channels ``state_dict`` implies for architecture ``name``.

    Read from the shapes (no network is built), so a checkpoint for another label count can be
    refused before any work is done. None when the family cannot tell from its weights.
    """
    arch = get(name)
    if arch.config_from_state_dict is None:
        return None
    for raw in prefix_variants(state_dict):
        sd = arch.prepare_state_dict(raw) if arch.prepare_state_dict else raw
        try:
            config = arch.config_from_state_dict(sd) or {}
        except (KeyError, IndexError, ValueError, StopIteration):
            continue
        count = next((config[k] for k in OUTPUT_COUNT_KEYS if isinstance(config.get(k), int)), None)
        if count is not None:
            return count
    return None


#: Key prefixes a training wrapper may add that can also be a network's own first key component.
WRAPPER_PREFIXES = ("model.", "net.", "network.")


def prefix_variants(state_dict: StateDict) -> list[dict[str, torch.Tensor]]:
    """``state_dict`` as is, then with each wrapper prefix that every key shares removed in turn.

    A Lightning module stores ``self.model``'s weights as ``model.*``; MONAI's UNet has keys
    ``model.*`` of its own. Which reading is right depends on the network, so the loader tries
    these variants in order (least stripped first) and keeps the first that fits.
    """
    variants = [dict(state_dict)]
    while True:
        sd = variants[-1]
        prefix = next((p for p in WRAPPER_PREFIXES if sd and all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            return variants
        variants.append({k[len(prefix):]: v for k, v in sd.items()})


def _config_for(arch: Architecture, sd: StateDict, overrides: Mapping[str, Any]) -> dict[str, Any]:
    implied = {}
    if arch.config_from_state_dict is not None:
        try:
            implied = arch.config_from_state_dict(sd) or {}
        except (KeyError, IndexError, ValueError, StopIteration):
            implied = {}
    return {**implied, **overrides}


def _fits(arch: Architecture, sd: StateDict, config: Mapping[str, Any]) -> bool:
    try:
        with torch.device("meta"):
            model = arch.build(**config)
    except Exception:  # an impossible config for this variant: it simply does not fit
        return False
    return compare_keys(model.state_dict(), sd).ok


def load(name: str, state_dict: StateDict, **kwargs: Any) -> nn.Module:
    """Build ``name`` in the variant the state dict implies, load it strictly, return it in eval mode.

    Explicit ``kwargs`` override what the state dict implies (useful for settings a state dict
    cannot show, such as SegFormer3D's ``attn_scale``). Any mismatch raises a
    :class:`~volseg.errors.CheckpointError` naming missing, unexpected and wrongly shaped keys.
    """
    arch = get(name)
    variants = [arch.prepare_state_dict(v) if arch.prepare_state_dict else v for v in prefix_variants(state_dict)]
    chosen = next((v for v in variants if _fits(arch, v, _config_for(arch, v, kwargs))), variants[0])
    config = _config_for(arch, chosen, kwargs)
    # The card's config is data from elsewhere: built first without memory (on the meta device),
    # the network is checked against the checkpoint and its size against the memory available,
    # and only then built for real.
    skeleton = _skeleton(arch, config)
    if skeleton is not None:
        check_state_dict(skeleton, chosen, arch_name=arch.name, config=config)
        check_network_size(arch.name, skeleton)
    model = create(arch.name, **config)
    check_state_dict(model, chosen, arch_name=arch.name, config=config, given=kwargs)
    model.load_state_dict(chosen, strict=True)
    return model.eval()


def _skeleton(arch: Architecture, config: Mapping[str, Any]) -> nn.Module | None:
    """``arch`` built with ``config`` on the meta device (shapes, no memory); None when the
    family cannot be built there (it is then checked after the real build, as before)."""
    try:
        with torch.device("meta"):
            return create(arch.name, **config)
    except ArchitectureError:
        raise
    except Exception:  # noqa: BLE001 (an operation the meta device does not support)
        return None


def parameter_count(name: str, **config: Any) -> int:
    """The number of parameters (and buffers) of ``name`` built with ``config``, found without
    allocating them (built on the meta device).

    Raises:
        ArchitectureError: the config is not one ``name`` accepts.
    """
    with torch.device("meta"):
        model = create(name, **config)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def check_network_size(name: str, skeleton: nn.Module) -> None:
    """Refuse a network whose weights alone need more memory than is available.

    Raises:
        ResourceError: naming the architecture, its parameter count and the memory it needs.
    """
    from volseg.errors import ResourceError
    from volseg.memory import check_allocation

    count = sum(t.numel() for t in (*skeleton.parameters(), *skeleton.buffers()))
    nbytes = sum(t.numel() * t.element_size() for t in (*skeleton.parameters(), *skeleton.buffers()))
    try:
        check_allocation(nbytes, f"the network {name} ({count:,} parameters)")
    except ResourceError as exc:
        raise ResourceError(exc.message, hint="the model card's architecture.config (or --arch-config) makes this "
                            "network: check it; a smaller ROI does not help here") from None


@dataclass
class KeyReport:
    """The differences between a network's state dict and a checkpoint's."""

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, expected, found

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)


def compare_keys(expected: StateDict, found: StateDict) -> KeyReport:
    """Compare two state dicts by key and shape."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        (k, tuple(expected[k].shape), tuple(found[k].shape))
        for k in expected
        if k in found and tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    return KeyReport(missing, unexpected, wrong)


def _listing(items: list[Any], limit: int = 3) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _config_text(config: Mapping[str, Any], limit: int = 160) -> str:
    text = json.dumps(dict(config), default=str, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 4] + " ...}"


def check_state_dict(model: nn.Module, state_dict: StateDict, arch_name: str, config: Mapping[str, Any],
                     given: Mapping[str, Any] | None = None) -> None:
    """Raise a :class:`CheckpointError` explaining, in a few lines, how ``state_dict`` does not
    fit ``model`` and which registered architecture and configuration it does fit (what
    ``volseg inspect`` reports), if any.

    Args:
        given: the settings the user (card or ``--arch-config``) gave, named in the message;
            default: ``config``.
    """
    report = compare_keys(model.state_dict(), state_dict)
    if report.ok:
        return
    given = config if given is None else given
    what = f"{arch_name} with {_config_text(given)}" if given else f"{arch_name} (the configuration its weights imply)"
    parts = []
    if report.missing:
        parts.append(f"missing keys ({len(report.missing)}): {_listing(report.missing)}")
    if report.unexpected:
        parts.append(f"unexpected keys ({len(report.unexpected)}): {_listing(report.unexpected)}")
    if report.wrong_shape:
        shapes = [f"{k} expected {list(e)} found {list(f)}" for k, e, f in report.wrong_shape]
        parts.append(f"wrongly shaped ({len(shapes)}): {_listing(shapes, 2)}")
    fits = _what_it_fits(state_dict)
    if fits is not None:  # what it does fit says more than a list of keys: counts only
        parts = [f"{n} {kind}" for n, kind in ((len(report.missing), "keys missing"),
                                              (len(report.unexpected), "unexpected"),
                                              (len(report.wrong_shape), "wrongly shaped")) if n]
    message = f"the checkpoint does not fit {what}: " + "; ".join(parts)
    if fits is not None:
        found, others = fits
        message += (f". It fits {found.name} ({found.variant})" if found.variant else f". It fits {found.name}") + (
            f" and {others} other architecture(s)" if others else "")
        hidden = _hidden(found.name)
        shown = {k: v for k, v in found.config.items() if k not in hidden}
        if found.name == arch_name.lower():
            differ = sorted(k for k in given if k in shown and _plain(shown[k]) != _plain(given[k]))
            implied = {k: shown[k] for k in differ} or shown
            hint = (f"the checkpoint is {found.name} with other settings" + (f" ({', '.join(differ)})" if differ else "")
                    + f": its weights imply {_config_text(implied)}; fix the card's architecture.config (or "
                    "--arch-config), or use the checkpoint the card was written for")
        else:
            hint = (f"use a model card for {found.name}, or --arch {found.name} (its weights imply "
                    f"{_config_text(shown)}); `volseg inspect CHECKPOINT` says what else they cannot show")
    else:
        hint = _likely_cause(report, state_dict)
    raise CheckpointError(message, hint=hint)


def _plain(value: Any) -> Any:
    """``value`` as JSON sees it (tuples and lists alike)."""
    return json.loads(json.dumps(value, default=str))


def _what_it_fits(state_dict: StateDict) -> tuple[Match, int] | None:
    """The first registered architecture ``state_dict`` fits exactly, and how many others do."""
    try:
        found = match(state_dict)
    except Exception:  # noqa: BLE001 -- the diagnosis must not hide the mismatch itself
        return None
    return (found[0], len(found) - 1) if found else None


def _hidden(name: str) -> set[str]:
    from volseg.models.builtin import hidden_settings

    return set(hidden_settings(name))


def _likely_cause(report: KeyReport, state_dict: StateDict) -> str:
    n_found = len(state_dict)
    n_shared = n_found - len(report.unexpected)
    if n_shared < max(1, n_found // 2):
        return (
            "most keys differ: the checkpoint is probably for another architecture, one volseg does not know; "
            "run `volseg inspect CHECKPOINT` to see its keys"
        )
    if report.wrong_shape and all(k.split(".")[0] in {"out", "out_0", "linear_pred"} or "out" in k.split(".")[0]
                                  for k, _, _ in report.wrong_shape):
        return "only the output layer differs: the label count (out_chans / num_classes) is probably wrong"
    if report.wrong_shape:
        return ("shapes differ: a feature size, kernel size or channel count is probably wrong; "
                "`volseg inspect CHECKPOINT` reports the configuration the weights imply")
    return "some layers are missing or extra: the depth or a variant switch is probably wrong"


@dataclass
class Match:
    """An architecture and configuration that a state dict fits exactly."""

    name: str
    config: dict[str, Any]
    variant: str
    n_params: int


def match(state_dict: StateDict) -> list[Match]:
    """Every registered architecture whose implied configuration fits ``state_dict`` exactly.

    Networks are built on the ``meta`` device, so no memory is allocated for weights.
    """
    found: list[Match] = []
    for arch in all_architectures():
        if arch.config_from_state_dict is None:
            continue
        for raw in prefix_variants(state_dict):
            sd = arch.prepare_state_dict(raw) if arch.prepare_state_dict else raw
            try:
                config = arch.config_from_state_dict(sd)
            except Exception:  # a foreign state dict may break a family's shape reader
                config = None
            if config is None or not _fits(arch, sd, config):
                continue
            with torch.device("meta"):
                n_params = sum(p.numel() for p in arch.build(**config).parameters())
            variant = arch.describe_variant(config) if arch.describe_variant else ""
            found.append(Match(arch.name, config, variant, n_params))
            break
    return found
