"""A zipped bundle's errors name the zip and the member path inside it (never the private copy it
was unpacked into); a folder's errors are named as before."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from test_bundles import BUNDLES, copy_bundle
from volseg.bundles.metadata import read_format
from volseg.bundles.source import MAX_CONFIG_BYTES, BundleError, open_bundle
from volseg.bundles.translate import translate
from volseg.cli.main import main


@pytest.fixture()
def spleen(tmp_path) -> Path:
    if not BUNDLES.is_dir():
        pytest.skip("../shared/monai-bundles is not beside this checkout")
    return copy_bundle(BUNDLES, "spleen_ct_segmentation", tmp_path / "src")


def zipped(bundle: Path, archive: Path, top: str | None = "spleen_ct_segmentation", **replace: bytes) -> Path:
    """``bundle`` as a zip (its files under ``top/``, or at the top), with some members' bytes replaced."""
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(bundle.rglob("*")):
            if p.is_file():
                rel = p.relative_to(bundle).as_posix()
                z.writestr(f"{top}/{rel}" if top else rel, replace.get(rel.replace("/", "__").replace(".", "_"),
                                                                         p.read_bytes()))
    return archive


def message(call) -> str:
    with pytest.raises(BundleError) as info:
        call()
    text = str(info.value)
    assert "volseg-bundle-" not in text  # never the private copy
    return info.value.message


def test_a_config_error_inside_a_zip_names_the_member(spleen, tmp_path) -> None:
    config = json.loads((spleen / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"][3]["pixdim"] = "$sorted([1, 2, 3])"  # a call: not a simple expression
    archive = zipped(spleen, tmp_path / "spleen.zip", configs__inference_json=json.dumps(config).encode())
    text = message(lambda: translate(open_bundle(archive)))
    assert text.startswith(f"{archive}: spleen_ct_segmentation/configs/inference.json: config key "
                           "'preprocessing#transforms#3#pixdim' is Python code")
    flat = zipped(spleen, tmp_path / "flat.zip", top=None, configs__inference_json=json.dumps(config).encode())
    assert message(lambda: translate(open_bundle(flat))).startswith(f"{flat}: configs/inference.json: config key")
    # the same bundle as a folder: named as before
    (spleen / "configs" / "inference.json").write_text(json.dumps(config))
    assert message(lambda: translate(open_bundle(spleen))).startswith(
        "spleen_ct_segmentation/configs/inference.json: config key 'preprocessing#transforms#3#pixdim'")


@pytest.mark.parametrize("member,content,expected", [
    ("configs__inference_json", b'{"network_def": ', "spleen_ct_segmentation/configs/inference.json is not valid JSON"),
    ("configs__inference_json", b'[1, 2]', "spleen_ct_segmentation/configs/inference.json does not hold a mapping"),
    ("configs__inference_json", b'{"a": "\xff\xfe"}', "spleen_ct_segmentation/configs/inference.json is not UTF-8 text"),
    ("configs__inference_json", b" " * (MAX_CONFIG_BYTES + 1),
     f"spleen_ct_segmentation/configs/inference.json is {MAX_CONFIG_BYTES + 1} bytes"),
    ("configs__metadata_json", b"{bad", "spleen_ct_segmentation/configs/metadata.json is not valid JSON"),
    ("configs__metadata_json", b'{"network_data_format": {}}',
     "spleen_ct_segmentation/configs/metadata.json: network_data_format#inputs is missing"),
], ids=["bad-json", "not-a-mapping", "not-utf8", "too-large", "bad-metadata", "no-inputs"])
def test_every_file_error_inside_a_zip_names_zip_and_member(spleen, tmp_path, member, content, expected) -> None:
    archive = zipped(spleen, tmp_path / "spleen.zip", **{member: content})

    def read():
        bundle = open_bundle(archive)
        read_format(bundle)
        translate(bundle)

    assert message(read).startswith(f"{archive}: {expected}")


def test_the_command_line_shows_the_member_path(spleen, tmp_path, capsys) -> None:
    archive = zipped(spleen, tmp_path / "spleen.zip", configs__metadata_json=b"{bad")
    assert main(["models", "--bundle", str(archive)]) == 2
    err = capsys.readouterr().err
    assert f"error: {archive}: spleen_ct_segmentation/configs/metadata.json is not valid JSON" in err
    assert "Traceback" not in err and "volseg-bundle-" not in err
