"""Checkpoint formats and wrappers, safe loading, and clear mismatch errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from monai.networks.nets import UNet
from safetensors.torch import save_file

from volseg import models
from volseg.checkpoints.reading import describe, read_checkpoint, sha256sum, unwrap
from volseg.errors import CheckpointError

CONFIG = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


@pytest.fixture(scope="module")
def unet_sd():
    torch.manual_seed(0)
    return UNet(**CONFIG).state_dict()


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


WRAPPERS = {
    "plain.pth": lambda sd: sd,
    "dataparallel.pt": lambda sd: _prefixed(sd, "module."),
    "lightning.ckpt": lambda sd: {"epoch": 3, "global_step": 10, "state_dict": _prefixed(sd, "model."),
                                  "hyper_parameters": {"lr": 1e-3}},
    "nnunet.model": lambda sd: {"epoch": 1000, "state_dict": sd, "optimizer_state_dict": {},
                                "plot_stuff": ([0.1, 0.2], [0.3], [0.4], [0.5])},
    "monai_bundle.pt": lambda sd: {"model": sd, "optimizer": {}},
    "net.pth": lambda sd: {"net": sd},
    "network.pth": lambda sd: {"network": _prefixed(sd, "_orig_mod.")},
    "compiled_ddp.pt": lambda sd: {"model_state_dict": _prefixed(_prefixed(sd, "_orig_mod."), "module.")},
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrapped_checkpoints_unwrap_to_the_same_weights(name, unet_sd, tmp_path):
    path = tmp_path / name
    torch.save(WRAPPERS[name](unet_sd), path)
    ckpt = read_checkpoint(path)
    assert ckpt.format == "state_dict"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt.state_dict)
    net = models.load("unet", ckpt.state_dict, **CONFIG)  # a Lightning "model." prefix is resolved here
    assert not net.training
    loaded = net.state_dict()
    assert set(loaded) == set(unet_sd)
    for k, v in unet_sd.items():
        assert torch.equal(loaded[k], v)


def test_genuine_model_prefix_is_kept(unet_sd):
    """MONAI UNet's own keys start with "model.": a plain file must not lose that prefix."""
    from volseg.checkpoints.reading import unwrap as unwrap_

    assert set(unwrap_(dict(unet_sd)).state_dict) == set(unet_sd)
    assert [m.name for m in models.match(unet_sd)] == ["unet"]
    lightning = {"model." + k: v for k, v in unet_sd.items()}
    assert models.match(lightning)[0].config["channels"] == [4, 8, 16]


def test_safetensors(unet_sd, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in unet_sd.items()}, str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in unet_sd.items())


def test_accelerate_folder(unet_sd, tmp_path):
    folder = tmp_path / "checkpoint_best"
    folder.mkdir()
    torch.save(unet_sd, folder / "pytorch_model.bin")
    torch.save({"param_groups": []}, folder / "optimizer.bin")
    assert set(read_checkpoint(folder).state_dict) == set(unet_sd)


def test_torchscript(tmp_path):
    torch.manual_seed(0)
    net = UNet(**CONFIG).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 1, 16, 16, 16)), str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.format == "torchscript"
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.allclose(ckpt.module(x), net(x), atol=1e-5)
    assert describe(ckpt)["matches"][0]["architecture"] == "torchscript"


class Payload:
    """Unpickling this would run code (os.system) -- the classic malicious checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/volseg-pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, unet_sd):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"state_dict": unet_sd, "trap": Payload()}, f)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert "--trust-pickle" in err.value.hint
    assert "arbitrary code" in err.value.message
    assert "posix.system" in err.value.message or "os.system" in err.value.message


def test_trusted_pickle_is_allowed_when_asked(tmp_path, unet_sd):
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": unet_sd, "args": pickle.dumps}, path)  # a function: needs a full unpickle
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert set(read_checkpoint(path, trust_pickle=True).state_dict) == set(unet_sd)


def test_whole_pickled_module_with_trust(tmp_path):
    net = UNet(**CONFIG)
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    ckpt = read_checkpoint(path, trust_pickle=True)
    assert ckpt.format == "pickled-module"
    assert set(ckpt.state_dict) == set(net.state_dict())


def test_a_module_under_a_wrapper_key_is_read_with_trust(tmp_path):
    """{'model': nn.Module, 'epoch': 3}: refused with one instruction (volseg's, not torch's
    add_safe_globals advice too), read as that module's weights with --trust-pickle."""
    net = UNet(**CONFIG)
    path = tmp_path / "trainer.pt"
    torch.save({"model": net, "epoch": 3}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert "it holds a monai.networks.nets.unet.UNet object" in err.value.message
    assert "add_safe_globals" not in str(err.value) and "safe_globals" not in str(err.value)
    assert "--trust-pickle" in err.value.hint
    ckpt = read_checkpoint(path, trust_pickle=True)
    assert ckpt.format == "pickled-module" and ckpt.wrapper == ["model"] and ckpt.extras == {"epoch": 3}
    assert set(ckpt.state_dict) == set(net.state_dict())
    assert describe(ckpt)["matches"][0]["architecture"] == "unet"


@pytest.mark.parametrize("content,expected", [
    (b"", "cannot read checkpoint"),
    (b"this is not a checkpoint at all", "is not a PyTorch checkpoint"),
])
def test_garbage_files(tmp_path, content, expected):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(path)


def test_missing_file_and_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "no weights here"}, path)
    with pytest.raises(CheckpointError, match="no weights found"):
        read_checkpoint(path)


def test_sha256_is_checked(tmp_path, unet_sd):
    path = tmp_path / "w.pth"
    torch.save(unet_sd, path)
    read_checkpoint(path, sha256=sha256sum(path))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_checkpoint(path, sha256="0" * 64)


def test_a_file_that_is_no_checkpoint_is_said_so_before_any_checksum(tmp_path, unet_sd):
    text = tmp_path / "README.txt"
    text.write_text("These are the weights, honest.\n")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint: it is a text file of 31 bytes") as info:
        read_checkpoint(text, sha256="0" * 64)
    assert "checksum" not in str(info.value) and "download it again from where the card says" not in str(info.value)
    card = tmp_path / "card.json"
    card.write_text('{"id": "x"}')
    with pytest.raises(CheckpointError, match="JSON file .a model card goes with --model"):
        read_checkpoint(card)
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(b"<html>sign in to download</html>")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        read_checkpoint(truncated)
    real = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in unet_sd.items()}, str(real))
    with pytest.raises(CheckpointError, match="checksum mismatch") as info:  # a checkpoint, but another one
        read_checkpoint(real, sha256="0" * 64)
    assert "the card's own checkpoint" in info.value.hint


def test_checkpoint_kind_from_the_first_bytes(tmp_path, unet_sd):
    from volseg.checkpoints.sniffing import checkpoint_kind

    torch.save(unet_sd, tmp_path / "zip.pt")
    torch.save(unet_sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in unet_sd.items()}, str(tmp_path / "s.bin"))  # any name
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "binary.pt").write_bytes(bytes(range(200, 256)))
    assert checkpoint_kind(tmp_path / "zip.pt") == "zip"
    assert checkpoint_kind(tmp_path / "legacy.pt") == "pickle"
    assert checkpoint_kind(tmp_path / "s.bin") == "safetensors"
    assert checkpoint_kind(tmp_path) == "folder"
    with pytest.raises(CheckpointError, match="empty"):
        checkpoint_kind(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="it is a binary file of [0-9,]+ bytes in no checkpoint format"):
        checkpoint_kind(tmp_path / "binary.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_kind(tmp_path / "missing.pt")


def test_implied_out_channels_from_shapes(unet_sd):
    assert models.implied_out_channels("unet", unet_sd) == 3
    assert models.implied_out_channels("unet", {"model." + k: v for k, v in unet_sd.items()}) == 3
    assert models.implied_out_channels("swinunetr", unet_sd) is None  # no shape reader: cannot tell


def test_mismatch_names_missing_unexpected_and_wrong_shapes(unet_sd):
    sd = dict(unet_sd)
    sd.pop("model.0.conv.unit0.conv.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        models.load("unet", sd, **CONFIG)
    text = str(err.value)
    assert "missing keys (1): model.0.conv.unit0.conv.bias" in text
    assert "unexpected keys (1): extra.weight" in text


def test_wrong_label_count_is_diagnosed(unet_sd):
    with pytest.raises(CheckpointError) as err:
        models.load("unet", unet_sd, **{**CONFIG, "out_channels": 5})
    assert "wrongly shaped" in err.value.message
    assert err.value.hint


def test_other_architecture_is_diagnosed(unet_sd):
    """The mismatch names what the file does fit (what `volseg inspect` knows), in a few lines."""
    with pytest.raises(CheckpointError) as err:
        models.load("segresnet", unet_sd, spatial_dims=3, in_channels=1, out_channels=3, init_filters=8)
    message, hint = err.value.message, err.value.hint
    assert "does not fit segresnet" in message and "It fits unet (channels [4, 8, 16], 1 residual units)" in message
    assert "keys missing" in message and "model.0.conv" not in message  # counts, not key lists
    assert "--arch unet" in hint and '"channels": [4, 8, 16]' in hint
    assert len(message) + len(hint) < 600


def test_same_architecture_other_settings_names_them(unet_sd):
    with pytest.raises(CheckpointError) as err:
        models.load("unet", unet_sd, **{**CONFIG, "channels": (4, 8, 32)})
    assert "It fits unet" in err.value.message
    assert "other settings (channels)" in err.value.hint and '"channels": [4, 8, 16]' in err.value.hint


def test_foreign_keys_that_fit_nothing_get_the_old_diagnosis():
    with pytest.raises(CheckpointError) as err:
        models.load("unet", {"foo.weight": torch.zeros(2), "bar.weight": torch.zeros(3)}, **CONFIG)
    assert "unexpected keys (2): foo.weight, bar.weight" in err.value.message
    assert "another architecture" in err.value.hint


def test_unwrap_keeps_scalar_extras():
    ckpt = unwrap({"epoch": 7, "state_dict": {"w": torch.zeros(2)}})
    assert ckpt.extras == {"epoch": 7}
    assert ckpt.wrapper == ["state_dict"]


def test_upper_case_safetensors_suffix(unet_sd, tmp_path):
    path = tmp_path / "W.SAFETENSORS"
    save_file({k: v.contiguous() for k, v in unet_sd.items()}, str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert set(ckpt.state_dict) == set(unet_sd)


def test_flat_state_dict_with_a_few_scalars_keeps_them_as_extras(unet_sd, tmp_path):
    path = tmp_path / "flat.pt"
    torch.save({**unet_sd, "extra_int": 3, "arch": "unet"}, path)
    ckpt = read_checkpoint(path)
    assert set(ckpt.state_dict) == set(unet_sd)
    assert ckpt.extras == {"extra_int": 3, "arch": "unet"}
    assert models.load("unet", ckpt.state_dict, **CONFIG) is not None


def test_mostly_scalars_is_still_no_weights():
    with pytest.raises(CheckpointError, match="no weights found"):
        unwrap({"epoch": 3, "lr": 0.1, "w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no weights found"):
        unwrap({"a.weight": torch.zeros(1), "b.weight": torch.zeros(1), "optimizer": {"state": {}}})


@pytest.mark.parametrize("content", [b"hello world", b"eeeeeeeeeeee", b"garbage\n" * 4])
def test_text_garbage_is_named_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert f"garbage.pt is not a PyTorch checkpoint: it is a text file of {len(content)} bytes" in err.value.message
    assert err.value.hint


def test_truncated_checkpoint_says_so(unet_sd, tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(unet_sd, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(cut)
    assert "torch.save zip archive but is truncated or corrupt" in err.value.message
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        read_checkpoint(empty)


# -- issue 18 (7, 10): a checkpoint path names any file: check its type, never echo its content --
def _volseg(*args, input=None, timeout=60):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import volseg

    env = {**os.environ, "PYTHONPATH": str(Path(volseg.__file__).parents[1]), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "volseg", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, input=input)


def test_a_fifo_checkpoint_is_refused_not_read_for_ever(tmp_path):
    """`segment`, `inspect` and the warm worker blocked on a FIFO (cancel ignored)."""
    import os

    from conftest import make_card

    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"is a FIFO \(named pipe\), not a regular file"):
        read_checkpoint(fifo)
    inspected = _volseg("inspect", str(fifo))
    assert inspected.returncode == 2 and "is a FIFO (named pipe), not a regular file" in inspected.stderr
    card = make_card(tmp_path, "c")
    ct = tmp_path / "ct.nrrd"
    import numpy as np
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16)), str(ct))
    args = [str(ct), "--model", str(card), "--checkpoint", str(fifo), "-o", str(tmp_path / "o.nrrd")]
    segmented = _volseg("segment", *args)
    assert segmented.returncode == 2 and "is a FIFO (named pipe)" in segmented.stderr
    import json

    served = _volseg("serve", input=json.dumps({"id": "f", "args": args}) + "\n")
    assert served.returncode == 0  # the worker answered and ended at EOF
    errors = [json.loads(line) for line in served.stdout.splitlines() if '"error"' in line]
    assert errors[-1]["request"] == "f" and "is a FIFO (named pipe)" in errors[-1]["message"]


def test_a_checkpoint_path_naming_a_private_file_does_not_echo_it(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\nsecret-token-1234\n")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(secret)
    text = f"{err.value.message} {err.value.hint}"
    assert "root:x" not in text and "secret" not in text.replace(str(secret), "")
    assert err.value.message == f"{secret} is not a PyTorch checkpoint: it is a text file of 50 bytes"
    binary = tmp_path / "key.bin"
    binary.write_bytes(b"\xc8\xc9SECRETKEY" + bytes(range(200, 256)))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(binary)
    assert "SECRET" not in err.value.message and "c8 c9" not in err.value.message
