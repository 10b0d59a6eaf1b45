"""Train the demonstration model that ``volseg demo`` runs.

It learns the 7 structures of slicerio's sample chest CT (CTChest4.nrrd) from that CT's own
segmentation (Segmentation.seg.nrrd). It is a demonstration of the software, not a medical
model: it has seen one patient. The network, preprocessing and label order come from
``Resources/ModelCards/demo.json``, so training and inference share one description.

    python scripts/train_demo.py [--iterations 600] [--out Resources/ModelCards/demo-chest-ct.safetensors]

Writes the weights as .safetensors (no pickle) in float16 and the file's sha256 into the card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import slicerio
import torch
from monai.losses import DiceCELoss
from safetensors.torch import save_file

from volseg import models
from volseg.cards import load_card
from volseg.checkpoints.reading import sha256sum
from volseg.io import read_inputs
from volseg.preprocessing.card_steps import preprocess

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "Resources" / "ModelCards" / "demo.json"
DATA = Path(slicerio.__file__).parent / "data"


def training_pair(card) -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessed CT (1, I, J, K) and its label map on the same grid."""
    volume = read_inputs([DATA / "CTChest4.nrrd"])
    seg = slicerio.read_segmentation(str(DATA / "Segmentation.seg.nrrd"))
    names = {s["labelValue"]: s["name"] for s in seg["segments"]}
    wanted = {lab.name: lab.value for lab in card.labels}
    labels = np.zeros(seg["voxels"].shape, np.float32)
    for value, name in names.items():
        labels[seg["voxels"] == value] = wanted[name]
    # Carry the labels through the same spatial preprocessing as the image (nearest for labels).
    both = np.concatenate([volume.array, labels[None]], axis=0)
    image = preprocess(volume.array, volume.ijk_to_ras, card.preprocessing).image
    steps = [s for s in card.preprocessing if s["name"] != "ScaleIntensityRange"]
    label_t = preprocess(both[1:], volume.ijk_to_ras, steps).image
    return torch.as_tensor(image.as_tensor()), torch.as_tensor(label_t.as_tensor()).round().long()


def random_crop(image, labels, size, rng):
    starts = [int(rng.integers(0, max(1, s - c + 1))) for s, c in zip(image.shape[1:], size)]
    sl = tuple(slice(s, s + c) for s, c in zip(starts, size))
    return image[(slice(None), *sl)], labels[(slice(None), *sl)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, nargs=3, default=[64, 64, 32])
    ap.add_argument("--out", type=Path, default=CARD.parent / "demo-chest-ct.safetensors")
    args = ap.parse_args()

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    card = load_card(CARD)
    image, labels = training_pair(card)
    net = models.create(card.architecture, **card.config).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.iterations)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start = time.time()
    for it in range(1, args.iterations + 1):
        pairs = [random_crop(image, labels, args.crop, rng) for _ in range(args.batch)]
        x = torch.stack([p[0] for p in pairs])
        y = torch.stack([p[1] for p in pairs])
        x = x * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.05, 0.05))  # intensity jitter
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 25 == 0 or it == 1:
            print(f"iteration {it}/{args.iterations} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    state = {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in net.eval().state_dict().items()}
    save_file(state, str(args.out), metadata={"card": card.id, "iterations": str(args.iterations)})
    raw = json.loads(CARD.read_text())
    raw["checkpoint"]["sha256"] = sha256sum(args.out)
    CARD.write_text(json.dumps(raw, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB), sha256 recorded in {CARD.name}")


if __name__ == "__main__":
    main()
