"""Reading checkpoints in the formats people actually publish, safely.

Supported: plain ``state_dict`` files (``.pt``/``.pth``/``.bin``), wrapped ones (``state_dict``,
``model``, ``net``, ``network`` ... as used by Lightning ``.ckpt``, nnU-Net ``.model``, MONAI
bundles), ``.safetensors``, TorchScript archives, and a folder written by
``accelerate.save_state`` (``pytorch_model.bin`` / ``model.safetensors`` inside).

Loading is weights-only by default: no pickled code runs. A file that needs full unpickling
(it stores Python objects) is refused with an explanation unless the caller passes
``trust_pickle=True`` (``--trust-pickle``), which the user should do only for files they trust.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from volseg.checkpoints.sniffing import checkpoint_kind
from volseg.checkpoints.limits import check_checkpoint_file
from volseg.errors import CheckpointError, ResourceError
from volseg.memory import check_allocation, require_regular_file

#: Keys under which training frameworks nest the weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights", "params")
#: Prefixes added by DataParallel/DDP and torch.compile: always removed.
STRIP_PREFIXES = ("module.", "_orig_mod.")
#: Prefixes that a Lightning module's attribute adds (``self.model``) but that are also genuine
#: first key components of some networks (MONAI's UNet keys start with ``model.``). They are
#: removed only where the network being loaded needs it: see ``volseg.models.registry.prefix_variants``.


@dataclass
class Checkpoint:
    """What a checkpoint file holds, unwrapped.

    Attributes:
        path: the file (or folder) read.
        format: ``"state_dict"``, ``"safetensors"``, ``"torchscript"`` or ``"pickled-module"``.
        state_dict: the weights with wrapper keys and prefixes removed (empty for TorchScript).
        module: the loaded TorchScript (or trusted pickled) module, if any.
        wrapper: the path of keys the weights were found under, e.g. ``["state_dict"]``.
        stripped_prefixes: prefixes removed from every key, e.g. ``["module."]`` (a prefix such as
            ``model.`` that may belong to the network itself is left for the loader to decide).
        extras: other top-level entries (epoch, plans, hyper-parameters), kept for ``inspect``.
    """

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    module: torch.nn.Module | None = None
    wrapper: list[str] = field(default_factory=list)
    stripped_prefixes: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        if self.module is not None:
            return sum(p.numel() for p in self.module.parameters())
        return sum(t.numel() for k, t in self.state_dict.items() if t.is_floating_point() and not _is_buffer(k))


def _is_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    actual = sha256sum(path)
    if actual.lower() != expected.lower():
        raise CheckpointError(
            f"checksum mismatch for {path}: the card expects sha256 {expected}, the file has {actual}",
            hint="the file is not the one the card was written for (corrupt, incomplete, or another release): "
            "use the card's own checkpoint (`volseg models` says where it comes from), or a card written for this file",
        )


def _is_torchscript(names: list[str] | None) -> bool:
    """Whether zip member ``names`` (None: not a zip) are those of a TorchScript archive."""
    if names is None:
        return False
    return any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names)


def _resolve_folder(path: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "checkpoint_final.pth"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path} is a folder without a checkpoint in it",
        hint="point at the weights file itself (model.safetensors, pytorch_model.bin, *.pt, *.pth)",
    )


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False, sha256: str | None = None) -> Checkpoint:
    """Read ``path`` and return its unwrapped weights (or TorchScript module)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="check the path given with --checkpoint or in the card")
    if path.is_dir():
        path = _resolve_folder(path)
    require_regular_file(path, "checkpoint", CheckpointError)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty",
                              hint="the download is incomplete; download it again")
    checkpoint_kind(path)  # "not a checkpoint" comes before "checksum mismatch"
    if sha256:
        verify_sha256(path, sha256)
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    names = check_checkpoint_file(path, trust_code=trust_pickle)  # regular file, sound archive, no bomb
    if _is_torchscript(names):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # RuntimeError, and assorted errors for damaged archives
            text = " ".join(str(exc).strip().splitlines()[:1])[:200] or type(exc).__name__
            raise CheckpointError(f"{path} looks like TorchScript but cannot be loaded: {text}",
                                  hint="the file may be damaged; download it again") from None
        return Checkpoint(path, "torchscript", module=module.eval())
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        return Checkpoint(path, "pickled-module", state_dict=dict(obj.state_dict()), module=obj)
    return unwrap(obj, path)


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_allocation(path.stat().st_size, f"loading checkpoint {path}")  # tensors are copied out of the map
    try:
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"cannot read safetensors file {path}: {text}") from None
    ckpt = unwrap(sd, path)
    ckpt.format = "safetensors"
    return ckpt


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except MemoryError:  # a legacy (non-zip) file declares each storage's size before its bytes
        raise ResourceError(
            f"loading checkpoint {path} needs more memory than is available (its tensors, as declared)",
            hint="if the file is much smaller than that, it is damaged: download it again; else free memory",
        ) from None
    except pickle.UnpicklingError as exc:
        if not _looks_like_torch_file(path):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint",
                                  hint="expected a .pt/.pth/.ckpt/.bin file written by torch.save, or .safetensors") from None
        if trust_pickle:
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise CheckpointError(f"cannot unpickle {path}: {text}") from None
        first = _blocked_object(str(exc))
        raise CheckpointError(
            f"{path} stores Python objects that only a full unpickle can rebuild, and a full unpickle can run "
            f"arbitrary code, so it was refused ({first})",
            hint="if you trust where this file comes from, pass --trust-pickle; better, re-save it as a plain "
            "state_dict or .safetensors",
        ) from None
    except Exception as exc:  # torch raises assorted errors (KeyError, IndexError, EOFError, ...) for bad bytes
        kind = _header_kind(path)
        if kind is None:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint",
                                  hint="expected a .pt/.pth/.ckpt/.bin file written by torch.save, or .safetensors") from None
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: it starts like a torch.save {kind} but is truncated or corrupt ({reason})",
            hint="download the file again and compare its size or checksum with the published one",
        ) from None


def _header_kind(path: Path) -> str | None:
    """``"zip archive"`` or ``"pickle"`` when the first bytes look like torch.save output, else None.

    torch.save writes a zip archive (torch >= 1.6, starts with ``PK``) or a pickle (protocol 2+
    starts with 0x80).
    """
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError:
        is_zip = False
    if head.startswith(b"PK") or is_zip:
        return "zip archive"
    if head[:1] == b"\x80":
        return "pickle"
    return None


def _looks_like_torch_file(path: Path) -> bool:
    return _header_kind(path) is not None


def _blocked_object(message: str) -> str:
    """What torch's weights-only refusal names as the offending object, in volseg's words.

    torch's message goes on with its own advice (``torch.serialization.add_safe_globals``), which
    is for programmers loading the file in Python; the user gets one instruction, volseg's hint.
    """
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it holds a {found.group(1)} object"
    for line in message.splitlines():
        if "Unsupported" in line:
            return " ".join(line.split("Please use", 1)[0].split()).rstrip(". ")
    return "it holds objects other than tensors and plain containers"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _split_flat_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A flat dict of mostly tensors plus a few scalars or strings (``{"epoch": 3, "conv.weight": ...}``):
    its tensor entries as the state_dict and the rest as extras; None when it is not such a dict."""
    if not isinstance(obj, dict):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    others = {k: v for k, v in obj.items() if k not in tensors}
    plain = all(isinstance(v, int | float | str | bool | type(None)) for v in others.values())
    if not tensors or not plain or len(tensors) <= len(others):
        return None
    return tensors, {str(k): v for k, v in others.items()}


def unwrap(obj: Any, path: Path | str = "<memory>") -> Checkpoint:
    """Find the weights inside a loaded checkpoint object and strip wrapper prefixes."""
    wrapper: list[str] = []
    extras: dict[str, Any] = {}
    current = obj
    for _ in range(4):
        if _is_state_dict(current):
            break
        if not isinstance(current, dict):
            break
        key = next((k for k in WRAPPER_KEYS if k in current and isinstance(current[k], dict | torch.nn.Module)), None)
        if key is None:
            break
        if isinstance(current[key], torch.nn.Module):  # {"model": net, "epoch": 3} (trusted full unpickle)
            extras = {k: v for k, v in current.items() if k != key and not isinstance(v, dict | list)} if not wrapper else extras
            module = current[key]
            return Checkpoint(Path(path), "pickled-module", state_dict=dict(module.state_dict()), module=module,
                              wrapper=[*wrapper, key], extras=extras)
        if not wrapper:
            extras = {k: v for k, v in current.items() if k != key and not isinstance(v, dict | list)}
        wrapper.append(key)
        current = current[key]
    if not _is_state_dict(current):
        split = _split_flat_state_dict(current)
        if split is not None:
            current, loose = split
            extras = {**extras, **loose}
    if not _is_state_dict(current):
        found = ", ".join(sorted(map(str, current))[:10]) if isinstance(current, dict) else type(current).__name__
        raise CheckpointError(
            f"no weights found in {path}: expected a state_dict (names -> tensors), found {found}",
            hint="weights are looked for under " + ", ".join(WRAPPER_KEYS),
        )
    sd = {k: v for k, v in current.items()}
    stripped: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped.append(prefix)
                changed = True
    return Checkpoint(Path(path), "state_dict", state_dict=sd, wrapper=wrapper, stripped_prefixes=stripped, extras=extras)


def not_in_weights(architecture: str, config: dict[str, Any]) -> dict[str, str]:
    """What a checkpoint of ``architecture`` cannot tell: each hidden constructor argument and the
    output activation, with what volseg does about it (for ``volseg inspect``)."""
    from volseg.models import builtin, registry

    said: dict[str, str] = {}
    for name, default in builtin.hidden_settings(architecture).items():
        said[name] = ("not in the weights: a model card (or --arch-config) must state it; volseg does not guess it"
                      if default is None else f"not in the weights: {default} unless a card states otherwise")
    kind = registry.get(architecture).output_kind
    if architecture.lower() in builtin.EITHER_ACTIVATION:
        said["activation"] = (f"not in the weights: softmax or sigmoid ({architecture} is trained both ways; the "
                              f"official release uses {kind}): a card's output.activation, or --activation")
    else:
        said["activation"] = f"not in the weights: {kind}, as {architecture} is trained (a card may say otherwise)"
    return said


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """A summary for ``volseg inspect``: format, keys, parameters, fitting architectures.

    Each match gives the configuration read from the weights (``config``: only what the shapes
    show) and, under ``not_in_weights``, the settings they cannot show -- volseg states these
    instead of presenting a guess as a fact.
    """
    from volseg import models
    from volseg.models.builtin import hidden_settings

    info: dict[str, Any] = {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "wrapper": ckpt.wrapper,
        "stripped_prefixes": ckpt.stripped_prefixes,
        "n_keys": len(ckpt.state_dict),
        "n_params": ckpt.n_params,
        "extras": {k: v for k, v in ckpt.extras.items() if isinstance(v, int | float | str)},
    }
    if ckpt.format == "torchscript":
        info["matches"] = [{"architecture": "torchscript", "config": {}, "variant": "TorchScript module",
                            "n_params": ckpt.n_params, "not_in_weights": {}}]
        return info
    info["matches"] = [
        {"architecture": m.name, "config": {k: v for k, v in m.config.items() if k not in hidden_settings(m.name)},
         "variant": m.variant, "n_params": m.n_params, "not_in_weights": not_in_weights(m.name, m.config)}
        for m in models.match(ckpt.state_dict)
    ]
    info["first_keys"] = list(ckpt.state_dict)[:8]
    return info
