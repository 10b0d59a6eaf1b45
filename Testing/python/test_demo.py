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


def test_demo_label_colours_tell_the_bones_apart():
    """Ribs and the three spine sections were four near-identical pale yellows: every pair of the
    demo's label colours is now far apart (Euclidean RGB distance)."""
    import itertools

    colours = {label.name: np.asarray(label.color, float) for label in load_card("demo").labels}
    distances = {(a, b): float(np.linalg.norm(colours[a] - colours[b])) for a, b in itertools.combinations(colours, 2)}
    assert min(distances.values()) > 100, min(distances.items(), key=lambda item: item[1])


def test_demo_card_resamples_to_the_spacing_it_was_trained_at(ct_path):
    """The first step resamples to CTChest4's own spacing (so the native CT is unchanged and any
    other resolution of it is brought to the grid the model knows), and the result is mapped back."""
    from volseg.io import read_volume

    card = load_card("demo")
    first = card.preprocessing[0]
    assert first["name"] == "Spacing"
    volume = read_volume(ct_path)
    np.testing.assert_allclose(first["args"]["pixdim"], volume.spacing, rtol=1e-6)


def test_picture_numbers_slices_says_which_way_and_marks_where_they_cut(tmp_path, monkeypatch):
    from volseg.demo import picture as demo_picture

    ct = np.full((40, 30, 12), 0.0)
    labels = np.zeros(ct.shape, np.uint8)
    captions = []
    real_text = demo_picture._text
    monkeypatch.setattr(demo_picture, "_text",
                        lambda draw, xy, text, *a, **k: (captions.append(text), real_text(draw, xy, text, *a, **k)))
    monkeypatch.setattr(demo_picture, "_letters", lambda *a: None)  # only the reference lines in yellow/pink
    demo_picture.overview_png(ct, labels, [], tmp_path / "p.png", spacing=(1.0, 1.0, 4.0), tile_height=96,
                              notice="", title="")
    assert captions[:4] == ["axial 4/12 (1 = inferior)", "axial 7/12 (1 = inferior)", "axial 10/12 (1 = inferior)",
                            "coronal 16/30 (1 = anterior)"]
    with Image.open(tmp_path / "p.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    yellow = np.flatnonzero((rgb == demo_picture.AXIAL_LINE).all(axis=-1).any(axis=1))  # rows with an axial line
    pink = np.flatnonzero((rgb == demo_picture.CORONAL_LINE).all(axis=-1).any(axis=1))
    assert len(yellow) == 3 and len(pink) == 1  # three axial slices on the coronal, the coronal on each axial
    top = 18  # the caption row above the slices (no band, no title)
    h = round(12 * 4.0 * 96 / max(30 * 1.0, 12 * 4.0))  # the coronal tile's height: 48 mm at 96 px for 48 mm
    expected = [top + int((12 - 1 - z + 0.5) * h / 12) for z in (9, 6, 3)]
    assert list(yellow) == expected
