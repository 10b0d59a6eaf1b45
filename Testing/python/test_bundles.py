"""MONAI bundles as models (issue 20): the ten Model Zoo bundles in ../shared/monai-bundles are
either run with the same answers as MONAI's own bundle run, or refused with one clear message;
bundles are hostile input (links, zip-slip, sizes); the CLI and the catalogue show them."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from volseg.bundles.source import BundleError, open_bundle
from volseg.bundles.translate import translate
from volseg.cli.main import main

BUNDLES = Path(__file__).resolve().parents[2].parent / "shared" / "monai-bundles"


@pytest.fixture(scope="session")
def bundles() -> Path:
    if not BUNDLES.is_dir():
        pytest.skip("../shared/monai-bundles is not beside this checkout")
    return BUNDLES


def copy_bundle(bundles: Path, name: str, dest: Path) -> Path:
    target = dest / name
    shutil.copytree(bundles / name, target)
    for p in [target, *target.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # the shared copy is read-only
    return target


def random_weights(bundle: Path, seed: int = 0) -> None:
    """models/model.pt: the network of the bundle's own network_def, built by MONAI's parser, seeded."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(next((bundle / "configs").glob("inference.*")))
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():  # batch-norm statistics away from 0/1, so that they matter
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")


def synthetic_ct(path: Path, shape=(44, 38, 20), spacing=(1.9, 1.7, 2.6)) -> np.ndarray:
    """A small CT-like NIfTI (HU-ish blobs), stored LPS-oriented so that Orientationd has work to do."""
    import nibabel as nib

    rng = np.random.default_rng(7)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    data = -100 + 250 * np.exp(-4 * ((grid[0] - 0.2) ** 2 + grid[1] ** 2 + (grid[2] + 0.1) ** 2))
    data += rng.normal(0, 30, shape)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return data


def monai_bundle_run(bundle: Path, image: Path, out: Path, data_key: str = "datalist") -> np.ndarray:
    """The bundle run the way MONAI runs it: `monai.bundle run` with its own inference config,
    only the data list (the config key ``data_key``), the output folder and the data loader's
    workers overridden."""
    import nibabel as nib
    from monai.bundle import run

    config = next((bundle / "configs").glob("inference.*"))
    run(run_id="run", meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(config),
        logging_file=str(bundle / "configs" / "logging.conf"), bundle_root=str(bundle), output_dir=str(out),
        **{data_key: [str(image)], "dataloader#num_workers": 0})
    written = sorted(out.rglob("*.nii.gz"))
    assert len(written) == 1, written
    return np.asarray(nib.load(str(written[0])).dataobj)


def volseg_run(bundle: Path, image: Path, out: Path) -> np.ndarray:
    import nibabel as nib

    code = main(["segment", str(image), "--bundle", str(bundle), "-o", str(out), "--device", "cpu",
                 "--progress", "none"])
    assert code == 0
    return np.asarray(nib.load(str(out)).dataobj)


def test_spleen_bundle_gives_the_same_label_map_as_monais_own_run(bundles, tmp_path) -> None:
    bundle = copy_bundle(bundles, "spleen_ct_segmentation", tmp_path)
    random_weights(bundle)
    image = tmp_path / "ct.nii.gz"
    synthetic_ct(image)
    expected = monai_bundle_run(bundle, image, tmp_path / "monai")
    got = volseg_run(bundle, image, tmp_path / "volseg.nii.gz")
    assert got.shape == expected.shape == (44, 38, 20)
    assert 0 < (expected == 1).sum() < expected.size  # both labels occur: the comparison means something
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))


REFUSED = {
    # bundle: (config key named, words of the message)
    "multi_organ_segmentation": ("network_def#node_a", "Python code"),
    "pancreas_ct_dints_segmentation": ("network_def#node_a", "Python code"),
    "prostate_mri_anatomy": ("postprocessing#transforms#1", "before Invertd"),
    "renalStructures_UNEST_segmentation": ("network_def#_target_", "scripts/"),
    "ventricular_short_axis_3label": ("network_def#spatial_dims", "2D bundle"),
}
#: Bundles run with the same label maps as MONAI's own run (tests below).
TRANSLATED = {"spleen_ct_segmentation", "swin_unetr_btcv_segmentation", "brats_mri_segmentation",
              "wholeBody_ct_segmentation", "segmentation_template"}


def test_every_shared_bundle_is_translated_or_refused_by_name(bundles) -> None:
    names = sorted(p.name for p in bundles.iterdir() if p.is_dir())
    assert len(names) == 10
    assert set(names) == set(REFUSED) | TRANSLATED and not set(REFUSED) & TRANSLATED
    for name in sorted(TRANSLATED):
        card = translate(open_bundle(bundles / name)).card
        assert card["labels"] and card["inference"]["runtime"] == "torch", name


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bundles_that_cannot_run_the_same_are_refused_with_one_clear_message(bundles, name, capsys) -> None:
    key, words = REFUSED[name]
    with pytest.raises(BundleError) as info:
        translate(open_bundle(bundles / name))
    assert f"'{key}'" in info.value.message and words in info.value.message
    assert info.value.hint  # what to do
    code = main(["segment", "ct.nii.gz", "--bundle", str(bundles / name), "-o", "x.seg.nrrd", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err


def test_spleen_card_carries_the_bundles_settings(bundles) -> None:
    card = translate(open_bundle(bundles / "spleen_ct_segmentation")).card
    assert card["architecture"] == {"name": "unet", "config": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"}}
    assert card["preprocessing"] == [
        {"name": "Orientation", "args": {"axcodes": "RAS"}},
        {"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"}},
        {"name": "ScaleIntensityRange", "args": {"a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1, "clip": True}}]
    assert card["inference"]["roi_size"] == [96, 96, 96] and card["inference"]["sw_batch_size"] == 4
    assert card["inference"]["overlap"] == 0.5 and card["inference"]["runtime"] == "torch"
    assert card["labels"][0]["name"] == "spleen" and card["labels"][0]["terminology"]["type"][2] == "Spleen"
    assert card["inputs"] == [{"name": "CT", "modality": "CT"}] and card["modality"] == "CT"
    assert "model_spleen_ct_segmentation_v1.pt" in card["checkpoint"]["published_at"]


def test_swin_unetr_card_drops_the_argument_monai_removed(bundles) -> None:
    """MONAI 1.6.1 cannot build this bundle's network_def as published (img_size); without it, the
    network MONAI's parser builds and the card's hold the same weights, strictly."""
    from monai.bundle import ConfigParser

    from volseg import models

    t = translate(open_bundle(bundles / "swin_unetr_btcv_segmentation"))
    assert "img_size" not in t.card["architecture"]["config"] and any("img_size" in n for n in t.notes)
    assert t.card["architecture"]["config"]["feature_size"] == 48 and len(t.card["labels"]) == 13
    parser = ConfigParser()
    parser.read_config(bundles / "swin_unetr_btcv_segmentation" / "configs" / "inference.json")
    del parser["network_def"]["img_size"]
    reference = parser.get_parsed_content("network_def")
    net = models.load(t.card["architecture"]["name"], reference.state_dict(), **t.card["architecture"]["config"])
    assert type(net) is type(reference) and net.state_dict().keys() == reference.state_dict().keys()


def test_trust_evaluates_only_the_expressions_needed_and_says_so_first(bundles) -> None:
    """wholeBody's pixdim (`$... if @displayable_configs#highres else ...`) is read without code,
    trusted or not: nothing is announced, nothing evaluated, the same card either way."""
    said: list[str] = []
    trusted = translate(open_bundle(bundles / "wholeBody_ct_segmentation"), trust=True, announce=said.extend)
    assert said == [] and trusted.code_to_run == []
    assert trusted.card == translate(open_bundle(bundles / "wholeBody_ct_segmentation")).card


def _edited(bundles: Path, tmp_path: Path, edit) -> Path:
    bundle = copy_bundle(bundles, "spleen_ct_segmentation", tmp_path)
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return bundle


def test_no_expression_runs_and_no_target_outside_the_allowlist_is_built(bundles, tmp_path) -> None:
    marker = tmp_path / "pwned"
    code = f"$open({str(marker)!r}, 'w').write('x')"
    bundle = _edited(bundles, tmp_path, lambda c: c["network_def"].update(channels=code))
    with pytest.raises(BundleError, match="network_def#channels"):
        translate(open_bundle(bundle))
    assert not marker.exists()
    shutil.rmtree(bundle)
    bundle = _edited(bundles, tmp_path, lambda c: c["preprocessing"]["transforms"].insert(
        2, {"_target_": "Lambdad", "keys": "image", "func": code}))
    with pytest.raises(BundleError, match=r"preprocessing#transforms#2"):
        translate(open_bundle(bundle))
    shutil.rmtree(bundle)
    bundle = _edited(bundles, tmp_path, lambda c: c["network_def"].update({"_target_": "os.system"}))
    with pytest.raises(BundleError, match="not a MONAI network"):
        translate(open_bundle(bundle))
    assert not marker.exists()


def test_macros_naming_other_files_are_refused(bundles, tmp_path) -> None:
    bundle = _edited(bundles, tmp_path, lambda c: c["inferer"].update(roi_size="%/etc/hosts#x"))
    with pytest.raises(BundleError, match="inferer#roi_size"):
        translate(open_bundle(bundle))


def test_links_and_oversized_files_inside_a_bundle_are_refused(bundles, tmp_path) -> None:
    bundle = copy_bundle(bundles, "spleen_ct_segmentation", tmp_path)
    meta = bundle / "configs" / "metadata.json"
    meta.rename(tmp_path / "elsewhere.json")
    meta.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(BundleError, match="symbolic link"):
        open_bundle(bundle)
    meta.unlink()
    (tmp_path / "elsewhere.json").rename(meta)
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").symlink_to(meta)
    with pytest.raises(BundleError, match="symbolic link"):
        translate(open_bundle(bundle))
    (bundle / "models" / "model.pt").unlink()
    (bundle / "configs" / "inference.json").write_text(" " * (5 * 2**20))
    with pytest.raises(BundleError, match="more than"):
        translate(open_bundle(bundle))


def _zip(path: Path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
    return path


def test_zip_bundles_are_checked_member_by_member(bundles, tmp_path) -> None:
    spleen = bundles / "spleen_ct_segmentation"
    good = {f"spleen/{p.relative_to(spleen)}": p.read_bytes() for p in spleen.rglob("*") if p.is_file()}
    card = translate(open_bundle(_zip(tmp_path / "spleen.zip", good))).card
    assert card["id"] == "spleen" and card["architecture"]["name"] == "unet"
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(_zip(tmp_path / "slip.zip", {**good, "../../evil.txt": b"x"}))
    assert not (tmp_path.parent / "evil.txt").exists()
    with pytest.raises(BundleError, match="symbolic link"):
        open_bundle(_zip(tmp_path / "link.zip", good, links=("spleen/configs/extra.json",)))
    with pytest.raises(BundleError, match="holds no bundle"):
        open_bundle(_zip(tmp_path / "empty.zip", {"readme.txt": b"x"}))
    with pytest.raises(BundleError, match="zip bomb"):
        open_bundle(_zip(tmp_path / "bomb.zip", {**good, "spleen/docs/big.bin": b"\0" * (8 * 2**20)}))


def test_models_shows_a_bundle_with_missing_weights_and_their_address(bundles, tmp_path, capsys, monkeypatch) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    copy_bundle(bundles, "spleen_ct_segmentation", cards)
    copy_bundle(bundles, "brats_mri_segmentation", cards)
    (cards / "linked").symlink_to(bundles / "prostate_mri_anatomy")  # a link in the cards folder: not followed
    monkeypatch.setenv("VOLSEG_CARDS_PATH", str(cards))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "spleen-ct-segmentation" in out and "brats-mri-segmentation" in out and "prostate-mri-anatomy" not in out
    assert ("weights missing: download https://developer.download.nvidia.com/assets/Clara/monai/tutorials/"
            "model_zoo/model_spleen_ct_segmentation_v1.pt into " + str(cards / "spleen_ct_segmentation")) in out
    assert main(["models", "--json"]) == 0
    listed = {m["id"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    spleen = listed["spleen-ct-segmentation"]
    assert spleen["bundle"]["weights"] == "missing" and spleen["card_path"] == str(cards / "spleen_ct_segmentation")
    assert [lab["name"] for lab in listed["brats-mri-segmentation"]["labels"]] == ["Tumor core", "Whole tumor",
                                                                                   "Enhancing tumor"]
    random_weights(cards / "spleen_ct_segmentation")
    assert main(["models", "--bundle", str(cards / "spleen_ct_segmentation")]) == 0
    assert "checkpoint: " + str(cards / "spleen_ct_segmentation" / "models" / "model.pt") in capsys.readouterr().out
    from volseg.cards import load_card

    card = load_card("spleen-ct-segmentation")  # by the id `volseg models` shows
    assert card.architecture == "unet" and card.checkpoint_path == cards / "spleen_ct_segmentation" / "models" / "model.pt"
    brats = load_card("brats-mri-segmentation")
    assert brats.activation == "sigmoid" and brats.checkpoint_path is None  # listed; its weights still missing


def test_bundle_card_writes_a_card_that_runs_like_the_bundle(bundles, tmp_path, capsys) -> None:
    import nibabel as nib

    bundle = copy_bundle(bundles, "spleen_ct_segmentation", tmp_path)
    random_weights(bundle)
    card = tmp_path / "spleen.json"
    assert main(["bundle-card", str(bundle), "-o", str(card)]) == 0
    assert json.loads(card.read_text())["checkpoint"]["path"] == str(bundle / "models" / "model.pt")
    assert main(["bundle-card", str(bundle), "-o", str(card)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    image = tmp_path / "ct.nii.gz"
    synthetic_ct(image, shape=(30, 28, 14))
    for args, out in (([ "--model", str(card)], "a.nii.gz"), (["--bundle", str(bundle)], "b.nii.gz"),
                      (["--model", str(bundle)], "c.nii.gz")):
        assert main(["segment", str(image), *args, "-o", str(tmp_path / out), "--device", "cpu", "--progress", "none"]) == 0
    a, b, c = (np.asarray(nib.load(str(tmp_path / n)).dataobj) for n in ("a.nii.gz", "b.nii.gz", "c.nii.gz"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_a_bundle_without_weights_says_where_to_get_them(bundles, capsys) -> None:
    code = main(["segment", "ct.nii.gz", "--bundle", str(bundles / "spleen_ct_segmentation"), "-o", "x.seg.nrrd",
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code != 0 and "has no weights" in err and "model_spleen_ct_segmentation_v1.pt" in err


def test_listing_bundles_needs_neither_torch_nor_monai(bundles, tmp_path) -> None:
    """The Slicer panel fills its list with `volseg models --json`: bundles in it stay torch-free."""
    from test_startup import probe

    cards = tmp_path / "cards"
    cards.mkdir()
    copy_bundle(bundles, "wholeBody_ct_segmentation", cards)
    (cards / "broken").mkdir()
    (cards / "broken" / "configs").mkdir()
    (cards / "broken" / "configs" / "metadata.json").write_text("{not json")
    (cards / "broken" / "configs" / "inference.json").write_text("{}")
    listing, one = probe(["models", "--json", "--cards-dir", str(cards)],
                         ["models", "--bundle", str(bundles / "brats_mri_segmentation")])
    assert listing["rc"] == 0 and listing["heavy"] == [], listing
    result = json.loads(listing["out"])
    whole = next(m for m in result["models"] if m["id"] == "wholebody-ct-segmentation")
    assert len(whole["labels"]) == 104 and whole["labels"][0]["name"] == "spleen"
    assert any("broken" in p and "not valid JSON" in p for p in result["problems"])
    assert one["rc"] == 0 and one["heavy"] == [] and "weights missing" in one["out"] and "T1c, T1, T2, FLAIR" in one["out"]


def test_a_trusted_expression_is_evaluated_by_monais_parser_and_untrusted_refused(bundles, tmp_path) -> None:
    def edit(config):
        config["preprocessing"]["transforms"][3]["pixdim"] = "@pixdim"
        config["pixdim"] = "$[1.5 * 2, 1.5, 2.0]"

    bundle = _edited(bundles, tmp_path, edit)
    with pytest.raises(BundleError, match=r"'pixdim' is Python code \(\$\[1.5 \* 2, 1.5, 2.0\]\)") as info:
        translate(open_bundle(bundle))
    assert "--trust-bundle-code" in info.value.hint
    said: list[str] = []
    t = translate(open_bundle(bundle), trust=True, announce=said.extend)
    assert said == ["pixdim: $[1.5 * 2, 1.5, 2.0]"] and t.code_to_run == said
    assert t.card["preprocessing"][1] == {"name": "Spacing", "args": {"pixdim": [3.0, 1.5, 2.0], "mode": "bilinear"}}


def test_a_reference_written_as_an_expression_needs_no_trust(bundles, tmp_path) -> None:
    def edit(config):
        config["steps"] = config["preprocessing"]["transforms"]
        config["preprocessing"]["transforms"] = "$@steps"

    card = translate(open_bundle(_edited(bundles, tmp_path, edit))).card
    assert [s["name"] for s in card["preprocessing"]] == ["Orientation", "Spacing", "ScaleIntensityRange"]


def test_trusted_bundle_code_builds_its_own_network_after_saying_which_code(bundles) -> None:
    import sys

    from volseg import models

    said: list[str] = []
    from volseg.bundles.translate import bundle_card

    card, t = bundle_card(bundles / "renalStructures_UNEST_segmentation", trust=True, announce=said.extend)
    assert said[0] == "network_def#_target_: scripts.networks.unest.UNesT (built by MONAI's bundle parser)"
    assert "scripts/networks/unest.py" in said[1] and said[1].startswith("importable: ")
    assert not any(k == "scripts" or k.startswith("scripts.") for k in sys.modules)  # nothing imported yet
    assert card.architecture == "bundle-renalstructures-unest-segmentation" and card.out_channels == 4
    assert [lab.name for lab in card.labels] == ["kidney cortex", "medulla", "pelvicalyceal system"]
    net = models.create(card.architecture)
    assert type(net).__module__ == "scripts.networks.unest" and type(net).__name__ == "UNesT"
    assert not any(k == "scripts" or k.startswith("scripts.") for k in sys.modules)  # set aside again


def test_a_bundles_torchscript_export_runs_where_its_network_is_its_own_code(bundles, tmp_path) -> None:
    import nibabel as nib
    from monai.networks.nets import UNet

    bundle = copy_bundle(bundles, "renalStructures_UNEST_segmentation", tmp_path)
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    net = UNet(3, 1, 4, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    torch.jit.script(net).save(str(bundle / "models" / "model.ts"))  # as `monai.bundle ckpt_export` writes it
    t = translate(open_bundle(bundle))
    assert t.card["architecture"] == {"name": "torchscript"} and t.card["output"]["channels"] == 4
    assert t.card["checkpoint"]["path"] == str(bundle / "models" / "model.ts")
    assert any("scripts/" in n and "models/model.ts" in n for n in t.notes)
    image = tmp_path / "ct.nii.gz"
    synthetic_ct(image, shape=(24, 20, 12), spacing=(3.0, 3.0, 4.0))
    assert main(["segment", str(image), "--bundle", str(bundle), "-o", str(tmp_path / "out.nii.gz"), "--device", "cpu",
                 "--progress", "none"]) == 0
    labels = np.asarray(nib.load(str(tmp_path / "out.nii.gz")).dataobj)
    assert labels.shape == (24, 20, 12) and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_bundle_card_with_trust_lists_every_piece_of_code_and_refuses_a_card_it_cannot_hold(bundles, tmp_path,
                                                                                             capsys) -> None:
    out = tmp_path / "dints.json"
    assert main(["bundle-card", str(bundles / "pancreas_ct_dints_segmentation"), "--trust-bundle-code",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    for piece in ("network_def#_target_: monai.networks.nets.DiNTS", "network_def#node_a:",
                  "arch_ckpt: $torch.load(@arch_ckpt_path", "importable: scripts/__init__.py"):
        assert "running the bundle's code: " + piece in err
    assert "a card file cannot hold" in err and not out.exists()
    # BraTS's channel-to-label lambda is read, not run, trusted or not: no code runs at all
    assert main(["bundle-card", str(bundles / "brats_mri_segmentation"), "--trust-bundle-code", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "running the bundle's code" not in captured.err and "read without running it" in captured.err
    assert "wrote" in captured.out and json.loads(out.read_text())["labels"][-1]["value"] == 4


def test_a_bundle_without_invertd_is_mapped_back_and_says_so(bundles, tmp_path) -> None:
    bundle = _edited(bundles, tmp_path, lambda c: c["postprocessing"]["transforms"].pop(1))
    t = translate(open_bundle(bundle))
    assert any("no Invertd" in n for n in t.notes) and t.card["output"]["activation"] == "softmax"


def test_brats_labels_are_the_bundles_lambda_read_without_running_it(bundles) -> None:
    """The card's sigmoid labels paint what MONAI's own postprocessing (Activationsd, AsDiscreted,
    and the Lambdad evaluated by MONAI's parser, here in the test) gives, on random logits."""
    from monai.bundle import ConfigParser

    from volseg.cards import parse_card
    from volseg.postprocessing.labels import to_labelmap

    t = translate(open_bundle(bundles / "brats_mri_segmentation"))
    card = parse_card(t.card)
    assert [(lab.channel, lab.value) for lab in card.labels] == [(1, 2), (0, 1), (2, 4)]
    assert card.activation == "sigmoid" and len(card.inputs) == 4 and card.config["init_filters"] == 16
    assert card.preprocessing == ({"name": "NormalizeIntensity", "args": {"nonzero": True, "channel_wise": True}},)
    assert list(card.inference.roi_size) == [240, 240, 160]
    parser = ConfigParser()
    parser.read_config(bundles / "brats_mri_segmentation" / "configs" / "inference.json")
    steps = [parser.get_parsed_content(f"postprocessing#transforms#{i}") for i in (0, 2, 3)]
    logits = torch.randn(3, 20, 18, 16, generator=torch.Generator().manual_seed(0)) * 2
    data = {"pred": logits.clone()}
    for step in steps:
        data = step(data)
    expected = np.asarray(data["pred"])[0]
    got = to_labelmap(torch.sigmoid(logits), card.labels, card.activation, card.threshold)
    assert {0, 1, 2, 4} <= set(np.unique(expected).tolist())
    np.testing.assert_array_equal(got, expected)


def test_hostile_configs_end_in_one_message(bundles, tmp_path) -> None:
    bundle = copy_bundle(bundles, "spleen_ct_segmentation", tmp_path)
    config = bundle / "configs" / "inference.json"
    good = config.read_text()
    chain = {f"k{i}": f"@k{i + 1}" for i in range(5000)}
    for text, words in (("[" * 100000 + "]" * 100000, "not valid JSON|too large"),
                        (json.dumps({**json.loads(good), "a": "@b", "b": "@a", "network_def": "@a"}), "resolve"),
                        (json.dumps({**json.loads(good), **chain, "k5000": 1, "network_def": "@k0"}), "resolve|network")):
        config.write_text(text)
        with pytest.raises(BundleError, match=words):
            translate(open_bundle(bundle))
    config.write_text(good)
    (bundle / "configs" / "metadata.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(BundleError, match="metadata.json"):
        translate(open_bundle(bundle))


# -- wholeBody_ct_segmentation: a $ expression read without eval; the label map mapped back nearest ------------

def test_wholebody_pixdim_expression_is_read_without_running_anything(bundles) -> None:
    t = translate(open_bundle(bundles / "wholeBody_ct_segmentation"))
    card = t.card
    assert card["preprocessing"] == [
        {"name": "Orientation", "args": {"axcodes": "RAS"}},
        {"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"}},
        {"name": "NormalizeIntensity", "args": {"nonzero": True}},
        {"name": "ScaleIntensity", "args": {"minv": -1.0, "maxv": 1.0}}]
    assert card["inference"] == {"roi_size": [96, 96, 96], "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian",
                                 "padding_mode": "replicate", "runtime": "torch", "amp": True}
    assert card["postprocessing"] == {"invert": "labels_nearest"} and card["output"]["channels"] == 105
    assert t.code_to_run == [] and any(n.startswith("pixdim (") and "[1.5, 1.5, 1.5]" in n for n in t.notes)


def test_lowres_choice_follows_the_reference(bundles, tmp_path) -> None:
    bundle = copy_bundle(bundles, "wholeBody_ct_segmentation", tmp_path)
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["displayable_configs"]["highres"] = False
    path.write_text(json.dumps(config))
    assert translate(open_bundle(bundle)).card["preprocessing"][1]["args"]["pixdim"] == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("text, why", [
    ("$__import__('os').system('touch {marker}')", "uses a call"),
    ("$open('{marker}', 'w').write('x')", "uses a call"),
    ("$[1.5, 1.5, 1.5] if open('{marker}', 'w') else [3.0, 3.0, 3.0]", "uses a call"),
    ("$().__class__.__bases__[0].__subclasses__()", "uses a call"),
    ("$@displayable_configs['highres']", "uses a subscript"),
    ("$(lambda: [1.5, 1.5, 1.5])()", "uses a call"),
    ("$[x for x in [1.5, 1.5, 1.5]]", "uses a comprehension"),
    ("$[1.5] * 3", "uses arithmetic"),
    ("$highres", "uses the name 'highres'"),
    ("$@displayable_configs#highres.real", "uses an attribute ('real')"),
    ("$" + "[" * 250 + "1.5" + "]" * 250, "is not a Python expression this reader can parse"),  # Python's parser: too many nested brackets
    ("$" + "not " * 400 + "True", "is longer than 1000 characters"),
    ("$[" + "1, " * 250 + "1]", "has more than 200 syntax nodes"),
    ("$@device if @displayable_configs#highres else [1.5, 1.5, 1.5]", "refers to @device, which is Python code"),
])
def test_hostile_expressions_are_still_refused_by_name_and_nothing_runs(bundles, tmp_path, text, why) -> None:
    marker = tmp_path / "pwned"
    bundle = copy_bundle(bundles, "wholeBody_ct_segmentation", tmp_path)
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["pixdim"] = text.format(marker=marker)
    path.write_text(json.dumps(config))
    with pytest.raises(BundleError) as info:
        translate(open_bundle(bundle))
    assert "'pixdim' is Python code" in info.value.message and "--trust-bundle-code" in info.value.hint
    assert f"this expression {why}" in info.value.message
    assert not marker.exists()


def test_the_safe_reader_allows_only_data_references_and_choices() -> None:
    from volseg.bundles.safe_expression import Unsafe, evaluate

    refs = {"a": 3, "b#c": "x", "l": [1, 2]}
    read = lambda text: evaluate(text, refs.__getitem__)  # noqa: E731
    assert read("$[1, -2.5, 'x', None, (True, False)]") == [1, -2.5, "x", None, (True, False)]
    assert read("$@a if @b#c == 'x' and not @a < 2 else 0") == 3
    assert read("$1 < @a <= 3 and 2 in @l and 'y' not in @b#c") is True
    assert read("$@a == 4 or @l") == [1, 2]
    assert read("$None if @a is None else @l") == [1, 2]
    for bad in ("$1 + 1", "$@l[0]", "$abs(-1)", "$@a.real", "$x", "$'a' < 1", "$f'{@a}'", "$@a @ @a",
                "$" + "(" * 300 + "1" + ")" * 300, "$" + "1 if 1 else " * 80 + "1", "$" + "1 " * 600):
        with pytest.raises(Unsafe):
            read(bad)
    with pytest.raises(Unsafe, match="not plain data"):
        evaluate("$@f", lambda key: print)


def test_labels_mapped_back_nearest_equal_monais_invertd() -> None:
    """The card's way back "labels_nearest" is MONAI's Invertd(nearest_interp=True) of the label map."""
    from monai.transforms import Compose, Invertd, Orientationd, Spacingd

    from volseg.preprocessing.card_steps import invert_labels_nearest, preprocess

    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 23, 17, 11)).astype(np.float32)
    affine = np.diag([-1.9, -1.7, 2.6, 1.0])
    pre = preprocess(image, affine, [{"name": "Orientation", "args": {"axcodes": "RAS"}},
                                     {"name": "Spacing", "args": {"pixdim": [1.5, 1.1, 1.5], "mode": "bilinear"}}])
    labels = torch.as_tensor(rng.integers(0, 7, size=pre.image.shape[1:]), dtype=torch.float32)
    from monai.data import MetaTensor

    monai_pre = Compose([Orientationd("image", "RAS"), Spacingd("image", (1.5, 1.1, 1.5), mode="bilinear")])
    data = monai_pre({"image": MetaTensor(torch.as_tensor(image), affine=torch.as_tensor(affine))})
    assert data["image"].shape == pre.image.shape
    data["pred"] = MetaTensor(labels[None].clone())
    expected = Invertd("pred", monai_pre, orig_keys="image", nearest_interp=True)(data)["pred"][0]
    got = invert_labels_nearest(labels.numpy(), pre)
    assert got.shape == (23, 17, 11) and len(np.unique(got)) == 7
    np.testing.assert_array_equal(got, np.asarray(expected).astype(np.uint16))


def test_wholebody_bundle_gives_the_same_label_map_as_monais_own_run(bundles, tmp_path) -> None:
    """105 channels, one 96^3 window, gaussian blending with replicate padding, the argmax mapped
    back nearest: MONAI's own run and volseg's give the same labels, many of them."""
    bundle = copy_bundle(bundles, "wholeBody_ct_segmentation", tmp_path)
    random_weights(bundle)
    image = tmp_path / "ct.nii.gz"
    synthetic_ct(image)
    expected = monai_bundle_run(bundle, image, tmp_path / "monai")
    got = volseg_run(bundle, image, tmp_path / "volseg.nii.gz")
    assert got.shape == expected.shape == (44, 38, 20)
    assert len(np.unique(expected)) >= 10  # many labels: the comparison means something
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))


# -- segmentation_template: SimpleInferer, the whole volume in one pass --------------------------------------

def test_template_card_runs_the_whole_volume_at_once(bundles) -> None:
    card = translate(open_bundle(bundles / "segmentation_template")).card
    assert card["inference"] == {"whole_volume": True, "runtime": "torch", "size_multiple": 8}
    assert card["preprocessing"] == [{"name": "ScaleIntensity", "args": {}}] and "postprocessing" not in card
    assert [lab["name"] for lab in card["labels"]] == ["category 1", "category 2", "category 3"]


def _template(bundles: Path, tmp_path: Path, shape) -> tuple[Path, Path]:
    bundle = copy_bundle(bundles, "segmentation_template", tmp_path)
    random_weights(bundle)
    image = bundle / "test_data" / "ct.nii.gz"  # under its dataset_dir, where its SaveImaged expects inputs
    image.parent.mkdir()
    synthetic_ct(image, shape=shape)
    return bundle, image


def test_template_bundle_gives_the_same_label_map_as_monais_own_run(bundles, tmp_path) -> None:
    bundle, image = _template(bundles, tmp_path, (48, 40, 24))
    expected = monai_bundle_run(bundle, image, tmp_path / "monai", data_key="data_list")
    got = volseg_run(bundle, image, tmp_path / "volseg.nii.gz")
    assert got.shape == expected.shape == (48, 40, 24)
    assert set(np.unique(expected)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))


def test_template_bundle_refuses_a_size_its_network_cannot_take_as_monai_fails_on_it(bundles, tmp_path,
                                                                                      capsys) -> None:
    bundle, image = _template(bundles, tmp_path, (44, 38, 20))
    with pytest.raises(Exception):  # noqa: B017  MONAI's own run: the UNet's skip connections do not fit
        monai_bundle_run(bundle, image, tmp_path / "monai", data_key="data_list")
    out = tmp_path / "volseg.nii.gz"
    code = main(["segment", str(image), "--bundle", str(bundle), "-o", str(out), "--device", "cpu",
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code != 0 and "multiple of 8" in err and "44 x 38 x 20" in err and "--roi-size" in err
    assert "Traceback" not in err and not out.exists()
    assert main(["segment", str(image), "--bundle", str(bundle), "-o", str(out), "--device", "cpu",
                 "--progress", "none", "--roi-size", "32", "32", "16"]) == 0  # in windows, as asked
    assert out.exists()


def test_labels_nearest_is_the_cards_way_back_with_or_without_probabilities(bundles, tmp_path) -> None:
    """A card's "invert": "labels_nearest" gives the same label map whether --probabilities is
    written or not (the probabilities still go back on their own way), and another one than the
    default way back (probabilities mapped back, then the labels)."""
    import nibabel as nib

    bundle = copy_bundle(bundles, "spleen_ct_segmentation", tmp_path)
    random_weights(bundle)
    card = translate(open_bundle(bundle)).card
    card["inference"]["roi_size"] = [32, 32, 32]
    image = tmp_path / "ct.nii.gz"
    synthetic_ct(image, shape=(30, 28, 14), spacing=(1.9, 1.7, 3.6))
    maps = {}
    for way, probs in (("labels_nearest", False), ("labels_nearest", True), ("probabilities", False)):
        path = tmp_path / f"{way}.json"
        path.write_text(json.dumps({**card, "postprocessing": {"invert": way}}))
        out = tmp_path / f"{way}-{probs}.nii.gz"
        extra = ["--probabilities", str(tmp_path / "p.nii.gz")] if probs else []
        assert main(["segment", str(image), "--model", str(path), "-o", str(out), "--device", "cpu",
                     "--progress", "none", *extra]) == 0
        maps[way, probs] = np.asarray(nib.load(str(out)).dataobj)
    assert nib.load(str(tmp_path / "p.nii.gz")).shape[:3] == (30, 28, 14)
    nearest, default = maps["labels_nearest", False], maps["probabilities", False]
    np.testing.assert_array_equal(maps["labels_nearest", True], nearest)
    assert 0 < (nearest == 1).sum() < nearest.size
    assert 0 < (nearest != default).sum() < 0.2 * nearest.size  # the same labels, other borders
