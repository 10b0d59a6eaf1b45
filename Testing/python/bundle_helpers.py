"""Helpers for comparing volseg with MONAI's own bundle run (issue 20), shared by the bundle tests.

A bundle is copied (writable), given seeded random weights built by MONAI's own parser from its
``network_def``, run by ``monai.bundle run`` with its own inference config (only the data list,
the output folder, the loader's workers and the overrides a test names changed), and run by
``volseg segment --bundle`` with the same overrides given as volseg's options.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

BUNDLES = Path(__file__).resolve().parents[2].parent / "shared" / "monai-bundles"


def copy_bundle(bundles: Path, name: str, dest: Path) -> Path:
    """A writable copy of ``bundles/name`` under ``dest`` (the shared copy is read-only)."""
    target = dest / name
    shutil.copytree(bundles / name, target)
    for p in [target, *target.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return target


@contextmanager
def bundle_code_importable(bundle: Path) -> Iterator[None]:
    """The bundle's own ``scripts`` package importable, as ``monai.bundle run`` makes it (bundle root on
    sys.path), and set aside again afterwards, so that another bundle's ``scripts`` is not reused."""
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))
        for name in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
            del sys.modules[name]


def random_weights(bundle: Path, seed: int = 0, overrides: dict[str, Any] | None = None, scale: float = 1.0) -> None:
    """models/model.pt: the network of the bundle's own ``network_def`` (with ``overrides`` applied, as
    the MONAI run applies them), built by MONAI's parser, seeded; batch-norm statistics moved away
    from 0/1 so that they matter; every floating weight multiplied by ``scale`` (a larger spread of
    logits, so that the label map of a random network is not one class)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(next((bundle / "configs").glob("inference.*")))
    for key, value in (overrides or {}).items():
        parser[key] = value
    torch.manual_seed(seed)
    with bundle_code_importable(bundle):
        net = parser.get_parsed_content("network_def")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        if scale != 1.0:
            for p in net.parameters():
                p.mul_(scale)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")


def synthetic_ct(path: Path, shape=(44, 38, 20), spacing=(1.9, 1.7, 2.6), seed: int = 7) -> np.ndarray:
    """A small CT-like NIfTI (HU-ish blobs), stored LPS-oriented so that Orientationd has work to do."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    data = -100 + 250 * np.exp(-4 * ((grid[0] - 0.2) ** 2 + grid[1] ** 2 + (grid[2] + 0.1) ** 2))
    data += rng.normal(0, 30, shape)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return data


def synthetic_mr(folder: Path, names: Sequence[str], shape=(30, 28, 18), spacing=(1.0, 1.0, 1.0)) -> list[Path]:
    """One small MR-like NIfTI per name (a bright blob of a different contrast in each, zero air around a
    head-like ellipsoid, so that NormalizeIntensity's ``nonzero`` matters), on one grid. Paths in order."""
    import nibabel as nib

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = (grid ** 2).sum(0) < 0.8
    blob = np.exp(-6 * ((grid[0] - 0.25) ** 2 + (grid[1] + 0.1) ** 2 + grid[2] ** 2))
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-stored: no transform may reorient it
    affine[:3, 3] = [-15.0, -14.0, -9.0]
    paths = []
    for i, name in enumerate(names):
        rng = np.random.default_rng(11 + i)
        data = (300 + 80 * i + (400 - 150 * i) * blob + rng.normal(0, 40, shape)) * head
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
        paths.append(path)
    return paths


def monai_bundle_run(bundle: Path, out: Path, run_id: str = "run", **overrides: Any) -> np.ndarray:
    """The bundle run the way MONAI runs it: ``monai.bundle run`` with its own inference config and
    metadata; changed only: the bundle root, the output folder, the data loader's workers and
    ``overrides`` (config key -> value, e.g. ``datalist=[...]``). Returns the one label map written."""
    import nibabel as nib
    from monai.bundle import run

    config = next((bundle / "configs").glob("inference.*"))
    with bundle_code_importable(bundle):
        run(run_id=run_id, meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(config),
            logging_file=str(bundle / "configs" / "logging.conf"), bundle_root=str(bundle), output_dir=str(out),
            **{"dataloader#num_workers": 0, **overrides})
    written = sorted(out.rglob("*.nii.gz"))
    assert len(written) == 1, written
    return np.asarray(nib.load(str(written[0])).dataobj)


def probabilities_postprocessing(bundle: Path) -> list[dict[str, Any]]:
    """The bundle's own ``postprocessing#transforms`` without the steps that turn probabilities into
    labels (``AsDiscreted``, ``Lambdad``), its ``SaveImaged`` writing float32: MONAI's run then writes
    the probabilities (after its ``Activationsd`` and ``Invertd``), one channel per network output."""
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    steps = [t for t in config["postprocessing"]["transforms"] if t["_target_"] not in ("AsDiscreted", "Lambdad")]
    for t in steps:
        if t["_target_"] == "SaveImaged":
            t["output_dtype"] = "$numpy.float32"
    return steps


def volseg_run(bundle: Path, inputs: Sequence[Path] | Path, out: Path, *options: str) -> np.ndarray:
    """``volseg segment INPUTS --bundle BUNDLE -o OUT`` on the CPU with ``options``; the label map written."""
    import nibabel as nib

    from volseg.cli.main import main

    inputs = [inputs] if isinstance(inputs, Path) else list(inputs)
    code = main(["segment", *map(str, inputs), "--bundle", str(bundle), "-o", str(out), "--device", "cpu",
                 "--progress", "none", *options])
    assert code == 0
    return np.asarray(nib.load(str(out)).dataobj)


def assert_same_grid(monai_out: Path, volseg_file: Path) -> None:
    """The label map MONAI's run wrote under ``monai_out`` and volseg's ``volseg_file`` lie on one grid
    (shape and voxel-to-world affine, to 1e-4 mm): identical arrays mean identical places."""
    import nibabel as nib

    expected = nib.load(str(next(monai_out.rglob("*.nii.gz"))))
    got = nib.load(str(volseg_file))
    assert got.shape[:3] == expected.shape[:3]
    np.testing.assert_allclose(got.affine, expected.affine, rtol=0, atol=1e-4)
