"""`volseg demo`: the embedded default runs end to end on slicerio's chest CT."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import slicerio
from PIL import Image
from volseg.cards import load_card
from volseg.checkpoints.reading import sha256sum
from volseg.cli.main import main
from volseg.demo.run import fresh_folder


NOTICE_RED = (170, 0, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def demo_run_events(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "-o", str(folder), "--progress", "json", "--device", "cpu"]) == 0
    return folder, [json.loads(line) for line in stdout.getvalue().splitlines()]


@pytest.fixture(scope="module")
def demo_run(demo_run_events):
    return demo_run_events[0]


def test_demo_done_event_is_last_and_names_the_picture(demo_run_events):
    folder, events = demo_run_events
    assert events[-1]["event"] == "done" and [e["event"] for e in events].count("done") == 1
    assert events[-1]["outputs"]["png"] == str(folder / "CTChest4-demo.png")
    assert events[-1]["outputs"]["segmentation"] == str(folder / "CTChest4-demo.seg.nrrd")
    assert "picture" in events[-1]["timings"] and events[-1]["startup_s"] >= 0


def test_demo_checkpoint_matches_its_card():
    card = load_card("demo")
    assert card.demonstration and "NOT for clinical use" in card.title
    assert card.checkpoint_path.is_file()
    assert sha256sum(card.checkpoint_path) == card.checkpoint_sha256


def test_demo_writes_a_segmentation_that_matches_the_reference(demo_run, ct_segmentation_path):
    seg = slicerio.read_segmentation(str(demo_run / "CTChest4-demo.seg.nrrd"))
    names = [s["name"] for s in seg["segments"]]
    assert names == [lab.name for lab in load_card("demo").labels]
    ref = slicerio.read_segmentation(str(ct_segmentation_path))
    got, want = np.asarray(seg["voxels"]), np.asarray(ref["voxels"])
    assert got.shape == want.shape
    np.testing.assert_allclose(seg["ijkToLPS"], ref["ijkToLPS"], atol=1e-4)
    ref_value = {s["name"]: s["labelValue"] for s in ref["segments"]}
    got_value = {s["name"]: s["labelValue"] for s in seg["segments"]}
    # The demonstration model was trained on this very CT: the large structures must come back.
    for name in ("right lung", "left lung", "tissue"):
        assert dice(got == got_value[name], want == ref_value[name]) > 0.85, name


def test_demo_writes_a_picture(demo_run):
    png = demo_run / "CTChest4-demo.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > im.height > 100
        rgb = np.asarray(im.convert("RGB"))
    pixels = rgb.reshape(-1, 3)
    assert (np.abs(pixels[:, 0].astype(int) - pixels[:, 1]) > 20).any()  # coloured labels, not only grey
    assert (rgb[2:20, 2:200] == NOTICE_RED).all(axis=-1).mean() > 0.5  # the not-for-clinical-use band on top
    key_area = rgb[-40:].reshape(-1, 3)  # the colour key: a swatch of every label's colour
    for label in load_card("demo").labels:
        assert (key_area == label.color).all(axis=-1).sum() >= 50, label.name


def test_picture_outlines_big_labels_and_letters_every_side(tmp_path, monkeypatch):
    from volseg.demo import picture as demo_picture

    ct = np.full((40, 40, 10), 0.0)
    labels = np.zeros((40, 40, 10), np.uint8)
    labels[5:35, 5:35] = 1  # 56 % of the volume: outlined
    labels[18:22, 18:22] = 2  # small: filled
    key = [demo_picture.KeyEntry(1, "big", (0, 255, 0)), demo_picture.KeyEntry(2, "small", (255, 0, 0))]
    letters = []
    monkeypatch.setattr(demo_picture, "_letters", lambda draw, box, text, font: letters.append(text))
    demo_picture.overview_png(ct, labels, key, tmp_path / "p.png", spacing=(1.0, 1.0, 4.0), tile_height=80)
    assert letters == [("R", "A", "L", "P")] * 3 + [("R", "S", "L", "I")]
    tile = demo_picture._render(ct[:, :, 5].T, labels[:, :, 5].T, key, {1}, (80, 80), 0.45)
    assert (tile[10, 40] == (0, 255, 0)).all()  # the big label's edge in its colour
    inside = tile[30, 30].astype(int)  # inside it, the CT stays nearly grey (a faint fill)
    assert inside[1] - inside[0] < 40
    assert (tile[40, 40].astype(int)[0] - tile[40, 40].astype(int)[1]) > 80  # the small label is filled


def test_demo_never_overwrites(demo_run, capsys):
    assert main(["demo", "-o", str(demo_run), "--progress", "none"]) == 2
    assert "exists" in capsys.readouterr().err


def test_fresh_folder_numbers_existing_names(tmp_path):
    base = tmp_path / "volseg-demo"
    assert fresh_folder(base) == base
    base.mkdir()
    (tmp_path / "volseg-demo-2").mkdir()
    assert fresh_folder(base) == tmp_path / "volseg-demo-3"


def test_to_lps_axes_undoes_any_storage_order():
    from volseg.demo.run import to_lps_axes

    a = np.arange(24).reshape(2, 3, 4)
    lps = np.eye(3)
    # Stored as (S, A, R): index axes point to +S, -P (anterior), -L (right).
    direction = np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]], float)
    stored = np.flip(np.flip(np.transpose(a, (2, 1, 0)), axis=1), axis=2)
    np.testing.assert_array_equal(to_lps_axes(stored, direction), a)
    np.testing.assert_array_equal(to_lps_axes(a, lps), a)


def test_demo_output_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep")
    assert main(["demo", "-o", str(target), "--progress", "none", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "internal error" not in err
    assert target.read_text() == "keep"


def test_demo_overwrite_replaces_earlier_results_only_when_asked(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "CTChest4-demo.png").write_bytes(b"old picture")
    (folder / "CTChest4-demo.seg.nrrd").write_bytes(b"old result")
    assert main(["demo", "-o", str(folder), "--progress", "none", "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err  # the hint names a flag demo has
    assert (folder / "CTChest4-demo.seg.nrrd").read_bytes() == b"old result"
    assert main(["demo", "-o", str(folder), "--progress", "none", "--device", "cpu", "--overwrite"]) == 0
    assert str(folder / "CTChest4-demo.png") in capsys.readouterr().err  # --progress none says where it went
    with Image.open(folder / "CTChest4-demo.png") as im:
        assert im.format == "PNG"
    seg = slicerio.read_segmentation(str(folder / "CTChest4-demo.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == [lab.name for lab in load_card("demo").labels]
