"""Reading a bundle's inference config section by section, as a volume goes through it.

:class:`SectionReader` turns ``network_def``, ``preprocessing``, ``inferer`` and
``postprocessing`` (resolved by :class:`~volseg.bundles.config.BundleConfig`, nothing run) into
the settings of a volseg card, or raises one :class:`~volseg.bundles.source.BundleError` naming
the config key and what to do. :mod:`volseg.bundles.translate` assembles the card.
"""

from __future__ import annotations

import inspect
from typing import Any

from volseg.bundles.config import BundleConfig, Expression, expressions_in
from volseg.bundles.metadata import card_id
from volseg.bundles.source import BundleError

#: MONAI network classes volseg builds from a bundle -> volseg architecture name.
NETWORKS = {"UNet": "unet", "SegResNet": "segresnet", "SwinUNETR": "swinunetr", "UNETR": "unetr",
            "DynUNet": "dynunet"}
#: Arguments older MONAI releases took and MONAI 1.5+ dropped (they only checked the input size).
DROPPED_ARGUMENTS = {("SwinUNETR", "img_size")}
#: Preprocessing steps that volseg's reader does itself (loading, channel-first, float tensor).
READER_STEPS = {"LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "ToTensord", "AddChanneld", "EnsureChannelFirst",
                "LoadImage", "EnsureType", "ToTensor"}
#: Dictionary-only arguments, without meaning for the array transform.
DICT_ONLY = {"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "source_key", "start_coord_key",
             "end_coord_key", "overwriting", "lazy", "_disabled_", "_desc_", "_requires_"}
_RESAMPLING = {"Spacing", "Resize", "Zoom", "Affine", "Rotate", "Rotate90", "Flip"}
_ALSO_OK = {"_target_", "_desc_", "_requires_"}


def _key(key: str) -> str:
    return key.replace("::", "#")


def _short_target(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if isinstance(target, str) else repr(target)


class SectionReader:
    """One bundle config's sections read into card settings (see the module's docstring)."""

    def __init__(self, config: BundleConfig, announce=None) -> None:
        self.config = config
        self.source = config.source
        self.notes: list[str] = []
        self.code_run: list[str] = []
        self.announce = announce
        self.unsafe: dict[str, str] = {}  # expression key -> why the safe reader left it (for the message)

    def refuse(self, key: str, what: str, hint: str) -> BundleError:
        error = BundleError(f"{self.source}: config key {_key(key)!r} {what}", hint=hint)
        error.key = _key(key)
        return error

    def literal(self, value: Any, key: str) -> Any:
        """``value`` with no expression left in it, else the message naming the expression's key."""
        found = expressions_in(value)
        if found:  # the simple ones (literals, references, x if c else y) read as data, nothing run
            value = self.read_safely(value)
            found = expressions_in(value)
        if found and self.config.trust:
            return self._evaluated(value)
        if found:
            expr = found[0]
            text = " ".join(expr.text.split())
            why = self.unsafe.get(expr.key)
            because = (f"; this expression {why} (without running code volseg reads only literals, lists, "
                       "@references to data, x if c else y, and/or/not and comparisons)") if why else ""
            raise self.refuse(expr.key, f"is Python code ({text[:160]}), needed at {_key(key)!r}{because}",
                              hint="volseg evaluates no code from a bundle unless you pass --trust-bundle-code "
                              "(then it evaluates this expression with MONAI's bundle parser); or write the value "
                              "into a card: `volseg bundle-card BUNDLE -o card.json` after editing a copy of the config")
        return value

    def read_safely(self, node: Any, depth: int = 0) -> Any:
        """``node`` with each expression :mod:`volseg.bundles.safe_expression` can read replaced by its
        value (the others left as they are); tuples become lists (as a card holds them)."""
        from volseg.bundles.safe_expression import Unsafe, evaluate

        if isinstance(node, Expression):
            try:
                value = evaluate(node.text, lambda ref: self._reference(ref, depth + 1))
            except Unsafe as why:
                self.unsafe.setdefault(node.key, str(why))
                return node
            value = self.read_safely(value, depth)
            line = f"{_key(node.key)} ({' '.join(node.text.split())[:120]}) read without running it: {value!r}"
            if line not in self.notes:
                self.notes.append(line)
            return value
        if isinstance(node, dict):
            return {k: self.read_safely(v, depth) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [self.read_safely(v, depth) for v in node]
        return node

    def _reference(self, ref: str, depth: int) -> Any:
        """A referenced key's value for a safely read expression: plain data, else :class:`Unsafe`."""
        from volseg.bundles.safe_expression import MAX_REFERENCE_DEPTH, Unsafe

        if depth > MAX_REFERENCE_DEPTH:
            raise Unsafe(f"follows references more than {MAX_REFERENCE_DEPTH} deep")
        ref = ref.replace("::", "#")
        if not self.config.has(ref):
            raise Unsafe(f"refers to @{ref}, which is not a config key")
        try:
            value = self.read_safely(self.config.resolved(ref), depth)
        except BundleError:
            raise Unsafe(f"refers to @{ref}, which does not resolve") from None
        if expressions_in(value):
            raise Unsafe(f"refers to @{ref}, which is Python code")
        return value

    def _evaluated(self, node: Any) -> Any:
        if isinstance(node, Expression):
            line = f"{_key(node.key)}: {' '.join(node.text.split())}"
            if line not in self.code_run:
                if self.announce is not None:
                    self.announce([line])
                self.code_run.append(line)
            return self.config.evaluate(node)
        if isinstance(node, dict):
            return {k: self._evaluated(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self._evaluated(v) for v in node]
        return node

    # -- network ---------------------------------------------------------------------------------
    def network(self) -> tuple[str, dict[str, Any], str]:
        """(volseg architecture, constructor arguments, MONAI class name)."""
        if not self.config.has("network_def"):
            raise self.refuse("network_def", "is missing", hint="a bundle's inference config defines its network there")
        net = self.config.resolved("network_def")
        if not isinstance(net, dict) or "_target_" not in net:
            raise self.refuse("network_def", "does not name a network (_target_)",
                              hint="a bundle's inference config defines its network there")
        dims = net.get("spatial_dims", 3)
        if dims != 3 and not isinstance(dims, Expression):
            raise self.refuse("network_def#spatial_dims", f"is {dims!r}: this is a 2D bundle",
                              hint="volseg segments 3D volumes with 3D networks; run this bundle with MONAI "
                              "(`python -m monai.bundle run --config_file configs/inference.json`)")
        target = net["_target_"]
        name = _short_target(target)
        module = str(target).rsplit(".", 1)[0] if "." in str(target) else ""
        custom = isinstance(target, Expression) or (module and not module.startswith("monai.networks.nets"))
        if self.config.trust and (custom or name not in NETWORKS):
            return self.bundle_network(net, str(getattr(target, "text", target)))
        if custom:
            own = str(target).startswith("scripts")
            raise self.refuse(
                "network_def#_target_",
                f"is {'the bundle’s own network ' if own else ''}{getattr(target, 'text', target)!r}"
                + (" (Python code under scripts/)" if own else ", not a MONAI network"),
                hint="volseg imports nothing from a bundle's scripts/ and builds only MONAI's own networks ("
                + ", ".join(NETWORKS) + "); export the network to TorchScript with MONAI "
                "(`python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file "
                "models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json` in the "
                "bundle) and volseg runs models/model.ts; or, if you trust the bundle's code, pass "
                "--trust-bundle-code and volseg imports it to build the network")
        args = {k: v for k, v in net.items() if k not in _ALSO_OK}
        if name not in NETWORKS:
            self.literal(args, "network_def")  # a network built from code: say which code first
            raise self.refuse("network_def#_target_", f"is {name}, a network volseg does not build from a bundle",
                              hint="volseg builds " + ", ".join(NETWORKS) + " from bundles; export the network to "
                              "TorchScript (models/model.ts, `python -m monai.bundle ckpt_export`) and volseg runs that")
        args = self.literal(args, "network_def")
        from monai.networks import nets

        cls = getattr(nets, name)
        params = inspect.signature(cls.__init__).parameters
        for arg in list(args):
            if (name, arg) in DROPPED_ARGUMENTS and arg not in params:
                del args[arg]
                self.notes.append(f"network_def#{arg} dropped: MONAI's {name} no longer takes it (it only checked "
                                  "the input size)")
            elif arg not in params:
                raise self.refuse(f"network_def#{arg}", f"is not an argument of MONAI's {name}",
                                  hint=f"{name} takes: " + ", ".join(p for p in params if p != "self"))
        return NETWORKS[name], args, name

    def expressions_reached(self, node: Any) -> list[Expression]:
        """The expressions in ``node`` and in every config key their text refers to (``@key``), transitively."""
        import re

        found: list[Expression] = []
        todo = expressions_in(node)
        while todo:
            expr = todo.pop(0)
            if any(e.key == expr.key for e in found):
                continue
            found.append(expr)
            for ref in re.findall(r"@([A-Za-z0-9_]+(?:(?:#|::)[A-Za-z0-9_]+)*)", expr.text):
                if self.config.has(ref):
                    value = self.config.resolved(ref)
                    todo += [value] if isinstance(value, Expression) else expressions_in(value)
        return found

    def bundle_network(self, net: dict[str, Any], target: str) -> tuple[str, dict[str, Any], str]:
        """Trusted: the network built by MONAI's parser from the bundle's own config and code,
        registered as an architecture of this process (after saying which code runs)."""
        from volseg.bundles.config import scripts_files
        from volseg.models.registry import Architecture, register

        code = [f"network_def#_target_: {target} (built by MONAI's bundle parser)"]
        code += [f"{_key(e.key)}: {' '.join(e.text.split())}" for e in self.expressions_reached(net)]
        files = scripts_files(self.config.bundle.root)
        if files:
            code.append("importable: " + ", ".join(files))
        for line in code:
            if self.announce is not None:
                self.announce([line])
            self.code_run.append(line)
        name = "bundle-" + card_id(self.config.bundle.name)
        config = self.config
        register(Architecture(name, f"the network of the MONAI bundle {config.bundle.name} ({target}), "
                              "built with its own code", lambda: config.instantiate("network_def")))
        return name, {}, _short_target(target)

    # -- preprocessing ---------------------------------------------------------------------------
    def transforms(self, section: str) -> list[tuple[str, dict[str, Any]]]:
        """(key, transform config) of each step of a Compose (or a list) under ``section``."""
        node = self.config.resolved(section) if self.config.has(section) else None
        if node is None:
            return []
        items = node.get("transforms") if isinstance(node, dict) else node
        key = f"{section}#transforms" if isinstance(node, dict) else section
        if isinstance(node, dict) and _short_target(node.get("_target_")) != "Compose":
            items, key = [node], section
        if isinstance(items, Expression):
            items = self.literal(items, key)
        if not isinstance(items, list):
            raise self.refuse(key, "is not a list of transforms", hint="expected Compose(transforms=[...])")
        out = []
        for n, t in enumerate(items):
            if not isinstance(t, dict) or "_target_" not in t:
                raise self.refuse(f"{key}#{n}", "is not a transform (no _target_)", hint="expected {_target_: ..., ...}")
            if t.get("_disabled_") is True:
                continue
            out.append((f"{key}#{n}", t))
        return out

    def preprocessing(self) -> list[dict[str, Any]]:
        from volseg.preprocessing.card_steps import build_transforms, resolve_transform

        steps = []
        for key, t in self.transforms("preprocessing"):
            name = _short_target(t["_target_"])
            if isinstance(t["_target_"], Expression):
                self.literal(t["_target_"], key)
            if name in READER_STEPS:
                continue
            array_name = name[:-1] if name.endswith("d") else name
            try:
                cls = resolve_transform(array_name)
            except Exception:
                raise self.refuse(f"{key}#_target_", f"is {name}, which volseg cannot translate into a card step",
                                  hint="volseg translates MONAI's spatial, intensity and crop/pad transforms "
                                  "(Orientationd, Spacingd, ScaleIntensityRanged, NormalizeIntensityd, "
                                  "CropForegroundd, ...); write a card for this model by hand") from None
            args = {k: v for k, v in t.items() if k not in DICT_ONLY and k != "_target_"}
            args = self.literal(args, key)
            if "source_key" in t and t["source_key"] != t.get("keys"):
                raise self.refuse(f"{key}#source_key", "takes the foreground from another image",
                                  hint="volseg crops by the input image itself; write a card by hand")
            params = inspect.signature(cls.__init__).parameters
            for arg, value in list(args.items()):
                if isinstance(value, (list, tuple)) and arg in ("mode", "padding_mode", "dtype") and value:
                    if len(set(map(str, value))) > 1:
                        raise self.refuse(f"{key}#{arg}", "differs between keys", hint="write a card by hand")
                    args[arg] = value[0]
                if arg not in params:
                    raise self.refuse(f"{key}#{arg}", f"has no equivalent in MONAI's {array_name}",
                                      hint="write a card for this model by hand")
            step = {"name": array_name, "args": args}
            try:
                build_transforms([step])
            except Exception as exc:
                raise self.refuse(key, f"({name}) does not translate: {getattr(exc, 'message', exc)}",
                                  hint="write a card for this model by hand") from None
            steps.append(step)
        return steps

    # -- inferer ---------------------------------------------------------------------------------
    def inferer(self) -> dict[str, Any]:
        if not self.config.has("inferer"):
            raise self.refuse("inferer", "is missing", hint="a bundle's inference config defines its inferer there")
        inf = self.config.resolved("inferer")
        name = _short_target(inf.get("_target_")) if isinstance(inf, dict) else None
        if name == "SliceInferer":
            raise self.refuse("inferer#_target_", "is SliceInferer: this is a 2D bundle (it runs slice by slice)",
                              hint="volseg segments 3D volumes with 3D networks; run this bundle with MONAI")
        if name == "SimpleInferer":  # one pass on the whole volume
            extra = [k for k in inf if k not in _ALSO_OK and k != "inferer_kwargs"] or (
                ["inferer_kwargs"] if inf.get("inferer_kwargs") else [])
            if extra:
                raise self.refuse(f"inferer#{extra[0]}", "has no equivalent in volseg's whole-volume inference",
                                  hint="remove it from a copy of the bundle if it does not change the results")
            return {"whole_volume": True, "runtime": "torch"}
        if name != "SlidingWindowInferer":
            raise self.refuse("inferer#_target_", f"is {name}, which volseg cannot translate",
                              hint="volseg runs SlidingWindowInferer (windows) and SimpleInferer (the whole volume "
                              "at once); write a card for this model by hand")
        ignored = {"device", "sw_device", "progress", "cache_roi_weight_map", "cpu_thresh", "buffer_steps",
                   "buffer_dim", "with_coord"}
        args = self.literal({k: v for k, v in inf.items() if k not in ignored and k not in _ALSO_OK}, "inferer")
        out: dict[str, Any] = {}
        roi = args.pop("roi_size", None)
        roi = [roi] * 3 if isinstance(roi, int) else roi
        if not (isinstance(roi, list) and len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi)):
            raise self.refuse("inferer#roi_size", f"is {roi!r}, not three positive window sizes",
                              hint="write a card by hand with inference.roi_size")
        out["roi_size"] = roi
        for arg, card_key in (("sw_batch_size", "sw_batch_size"), ("overlap", "overlap"), ("mode", "mode"),
                              ("sigma_scale", "sigma_scale"), ("padding_mode", "padding_mode")):
            if arg in args:
                value = args.pop(arg)
                if isinstance(value, (list, tuple)):
                    raise self.refuse(f"inferer#{arg}", "differs per axis", hint="volseg takes one value")
                out[card_key] = value
        cval = args.pop("cval", 0)
        if args or cval:
            extra = next(iter(args), "cval")
            raise self.refuse(f"inferer#{extra}", "has no equivalent in volseg's sliding window",
                              hint="remove it from a copy of the bundle if it does not change the results")
        out["runtime"] = "torch"  # the bundle's own numbers: no ONNX Runtime / OpenVINO conversion
        return out

    # -- postprocessing --------------------------------------------------------------------------
    def _channel_labels(self, t: dict[str, Any], key: str, result: dict[str, Any], on_input_grid: bool) -> bool:
        """A ``Lambdad`` of the form :mod:`volseg.bundles.label_lambda` reads (parsed, not run), after a
        sigmoid thresholded by ``AsDiscreted``: the labels' values and painting order. False: not that form."""
        from volseg.bundles.label_lambda import channel_labels

        pairs = channel_labels(t["func"].text)
        if pairs is None or result.get("activation") != "sigmoid" or "threshold" not in result or not on_input_grid:
            return False
        result["channel_labels"] = pairs
        self.notes.append(f"{_key(key)} (Lambdad) read without running it: channel -> label value, first wins: "
                          + ", ".join(f"{c} -> {v}" for c, v in pairs))
        return True

    def postprocessing(self, has_resampling: bool) -> dict[str, Any]:
        """{"activation", "threshold", "keep_largest_component", "fill_holes", "invert"} from the postprocessing
        ("invert": "labels_nearest" for an argmax before ``Invertd(nearest_interp=True)``)."""
        result: dict[str, Any] = {"activation": "softmax"}
        inverted = discrete_before_invert = False
        for key, t in self.transforms("postprocessing"):
            name = _short_target(t["_target_"])
            args = {k: v for k, v in t.items() if k not in DICT_ONLY and k not in _ALSO_OK}
            if name == "Activationsd":
                args = self.literal(args, key)
                if args.get("softmax"):
                    result["activation"] = "softmax"
                elif args.get("sigmoid"):
                    result["activation"] = "sigmoid"
                elif args.get("other") is not None:
                    raise self.refuse(f"{key}#other", "is a custom activation", hint="write a card by hand")
            elif name == "AsDiscreted":
                args = self.literal(args, key)
                if args.get("argmax"):
                    result["activation"] = "softmax" if result["activation"] != "sigmoid" else "sigmoid"
                elif args.get("threshold") is not None:  # MONAI keeps p >= t, volseg p > t: equal but on a tie
                    result["threshold"] = float(args["threshold"])
                    if result["activation"] != "sigmoid":
                        raise self.refuse(f"{key}#threshold", "thresholds channels that no sigmoid made",
                                          hint="write a card by hand")
                if args.get("to_onehot"):
                    raise self.refuse(f"{key}#to_onehot", "writes one-hot channels", hint="write a card by hand")
                if not inverted:
                    discrete_before_invert = True
            elif name == "Invertd":
                inverted = True
                nearest = self.literal(t.get("nearest_interp", True), f"{key}#nearest_interp")
                if discrete_before_invert and has_resampling and nearest is True and "threshold" not in result:
                    result["invert"] = "labels_nearest"  # the label map, nearest neighbour, as Invertd does
                elif discrete_before_invert and has_resampling:
                    raise self.refuse(key, "maps the label map (not the probabilities) back to the input grid"
                                      + ("" if nearest is True else " with interpolation (nearest_interp false)"),
                                      hint="volseg maps a label map back with nearest-neighbour interpolation only "
                                      "(an argmax before Invertd with nearest_interp true), or maps the "
                                      "probabilities back and then takes the labels; write the card with "
                                      "`volseg bundle-card` from a copy of the bundle whose AsDiscreted comes after Invertd")
            elif name in ("KeepLargestConnectedComponentd", "FillHolesd"):
                args = self.literal(args, key)
                if discrete_before_invert and has_resampling and not inverted:
                    raise self.refuse(key, f"({name}) cleans the label map on the network's grid, before Invertd maps it back",
                                      hint="volseg cleans the label map on the input grid; write a card by hand")
                if args.get("connectivity") not in (None, 3):
                    raise self.refuse(f"{key}#connectivity", "is not full (26-)connectivity",
                                      hint="volseg uses 26-connectivity")
                which = args.get("applied_labels")
                card_key = "keep_largest_component" if name.startswith("Keep") else "fill_holes"
                result[card_key] = [int(v) for v in which] if isinstance(which, (list, tuple)) else (
                    [int(which)] if isinstance(which, int) else True)
            elif name in ("SaveImaged", "CopyItemsd", "EnsureTyped", "ToTensord", "DeleteItemsd"):
                continue
            elif name == "Lambdad" and isinstance(t.get("func"), Expression) and self._channel_labels(t, key, result,
                                                                                                     inverted or not has_resampling):
                continue
            else:
                if not self.config.trust:
                    self.literal(args, key)  # code in it: say so first (trusted, nothing is run for a refusal)
                raise self.refuse(f"{key}#_target_", f"is {name}, which volseg cannot translate",
                                  hint="volseg translates Activationsd, AsDiscreted, Invertd, "
                                  "KeepLargestConnectedComponentd, FillHolesd and SaveImaged; write a card by hand")
        if has_resampling and not inverted:
            self.notes.append("the bundle's postprocessing has no Invertd (its own run writes the label map on the "
                              "resampled grid); volseg maps it back onto the input volume's grid")
        return result
