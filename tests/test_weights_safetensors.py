"""Weights in and out through safetensors: `chexcy export --safetensors`, `chexcy train --init-from`, and
the explicit adaptations (3-channel first conv, classifier of another size, num_batches_tracked)."""
import io
import json

import numpy as np
import pytest
import safetensors.numpy

from chexcy import cli
from chexcy.checkpoint import load_checkpoint, save_checkpoint
from chexcy.fileio import DamagedFileError
from chexcy.nn import BatchNorm2d, build_model
from chexcy.train import fit
from chexcy.weights import adapt_state_dict, init_from, read_weights

from data_fixtures import prepared

SIZE = 24


def randomise(model, rng):
    """Every parameter and BatchNorm statistic non-zero and far from its initial value (a file that was
    half-loaded or loaded into the wrong slots then shows)."""
    for p in model.parameters():
        p.data[:] = rng.normal(0.0, 0.3, p.data.shape) + np.where(rng.random(p.data.shape) < 0.5, -0.05, 0.05)
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.running_mean[:] = rng.normal(0.0, 0.5, m.num_features)
            m.running_var[:] = rng.uniform(0.3, 3.0, m.num_features)
    return model


def torch_like_file(path, model):
    """What `safetensors.torch.save_file(model.state_dict(), path)` writes for `model`: float32 arrays under
    the state-dict names, plus PyTorch's int64 num_batches_tracked counter per BatchNorm."""
    state = {name: np.ascontiguousarray(value) for name, value in model.state_dict().items()}
    for name in list(state):
        if name.endswith(".running_mean"):
            state[name[:-len("running_mean")] + "num_batches_tracked"] = np.array(1234, np.int64)
    safetensors.numpy.save_file(state, str(path))
    return state


def bf16_file(values, extra=None):
    """Bytes of a safetensors file holding `values` (float32, exactly representable in bfloat16) as BF16
    under the name "w", plus the float32 arrays of `extra`, written byte by byte as the format specifies."""
    bits = (np.ascontiguousarray(values, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    header, blobs, offset = {}, [], 0
    for name, blob, dtype, shape in [("w", bits, "BF16", values.shape)] + [
            (n, np.ascontiguousarray(v, "<f4").tobytes(), "F32", v.shape) for n, v in (extra or {}).items()]:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def test_bfloat16_arrays_are_widened_exactly(tmp_path):
    values = np.array([[1.0, -2.5], [3.0e-3, 65280.0]], np.float32)
    values = ((values.view(np.uint32) >> 16) << 16).view(np.float32)      # exactly representable in bfloat16
    (tmp_path / "bf16.safetensors").write_bytes(bf16_file(values, {"b": np.arange(3, dtype=np.float32)}))
    state = read_weights(tmp_path / "bf16.safetensors")
    assert state["w"].dtype == np.float32 and np.array_equal(state["w"], values)
    assert np.array_equal(state["b"], np.arange(3, dtype=np.float32))


@pytest.mark.parametrize("arch,config", [("simple", dict(widths=[4, 8])), ("resnet", dict(widths=[4, 8])),
                                         ("multiview", dict(backbone="resnet", widths=[4, 8], hidden=8))])
def test_export_then_init_from_gives_bitwise_equal_outputs(arch, config, tmp_path, rng, capsys):
    source = randomise(build_model(arch, seed=1, **config), rng).eval()
    ckpt = save_checkpoint(tmp_path / "m.npz", source, config={"image_size": SIZE})
    assert cli.main(["export", str(ckpt), "--safetensors", str(tmp_path / "w.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().err
    on_disk = safetensors.numpy.load_file(str(tmp_path / "w.safetensors"))
    assert set(on_disk) == set(source.state_dict()) and all(v.dtype == np.float32 for v in on_disk.values())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "w.safetensors"), "np") as f:
        assert f.metadata()["arch"] == arch and json.loads(f.metadata()["model_config"]) == source.config
    for weights in (tmp_path / "w.safetensors", ckpt):             # a .npz checkpoint is accepted as well
        target = build_model(arch, seed=2, **config)                # other seed: other initial weights
        assert init_from(target, weights) == []                     # nothing adapted
        target.eval()
        x = rng.normal(size=(3, 1, SIZE, SIZE)).astype(np.float32)
        if arch == "multiview":
            args = (x, x[::-1].copy(), np.array([1, 0, 1.0]), np.array([1, 1, 0.0]), np.full((3, 2), 0.3))
            assert np.array_equal(target.forward(*args), source.forward(*args))
        else:
            assert np.array_equal(target.forward(x), source.forward(x))


def features(model, x):
    return model.pool.forward(model.trunk.forward(x))


def test_three_channel_first_conv_is_summed_and_equals_rgb_model_on_repeated_gray(tmp_path, rng):
    rgb = randomise(build_model("resnet", widths=[4, 8], in_channels=3, seed=1), rng).eval()
    torch_like_file(tmp_path / "rgb.safetensors", rgb)
    gray = build_model("resnet", widths=[4, 8], seed=2)
    notes = init_from(gray, tmp_path / "rgb.safetensors")
    assert any("trunk.0.weight: 3-channel first conv (4, 3, 3, 3) summed" in n for n in notes), notes
    assert any("ignored 6 BatchNorm num_batches_tracked" in n for n in notes), notes
    gray.eval()
    x = rng.normal(size=(5, 1, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(gray.forward(x), rgb.forward(np.repeat(x, 3, axis=1)), rtol=1e-5, atol=1e-5)


def test_imagenet_classifier_is_reinitialised_and_first_conv_adapted(tmp_path, rng):
    """A file from a 3-channel, 1000-class network: the trunk loads (first conv summed), the classifier keeps
    its fresh initialisation for 14 outputs, and the notes say both."""
    imagenet = randomise(build_model("resnet", widths=[4, 8], in_channels=3, num_classes=1000, seed=1), rng).eval()
    torch_like_file(tmp_path / "in1k.safetensors", imagenet)
    gray = build_model("resnet", widths=[4, 8], seed=2)
    fresh_head = {n: v for n, v in gray.state_dict().items() if n.startswith("head.")}
    notes = init_from(gray, tmp_path / "in1k.safetensors")
    assert any("classifier head.0.weight (1000, 8) and head.0.bias (1000,) re-initialised for 14 outputs" in n
               for n in notes), notes
    state = gray.state_dict()
    for name, value in fresh_head.items():
        assert np.array_equal(state[name], value), name
    gray.eval()
    x = rng.normal(size=(4, 1, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(features(gray, x), features(imagenet, np.repeat(x, 3, axis=1)), rtol=1e-5,
                               atol=1e-5)


def test_every_other_misfit_is_an_error_naming_the_entry(tmp_path, rng):
    model = build_model("resnet", widths=[4, 8])
    good = {n: v.copy() for n, v in model.state_dict().items()}

    def error_for(state):
        with pytest.raises(ValueError) as info:
            adapt_state_dict(build_model("resnet", widths=[4, 8]), state)
        return str(info.value)

    assert "missing entries trunk.1.bias" in error_for({n: v for n, v in good.items() if n != "trunk.1.bias"})
    assert "unexpected entries extra.weight" in error_for({**good, "extra.weight": np.ones(3, np.float32)})
    wrong = dict(good)
    wrong["trunk.4.branch.0.weight"] = np.ones((4, 4, 5, 5), np.float32)
    assert "trunk.4.branch.0.weight has shape (4, 4, 5, 5), expected (4, 4, 3, 3)" in error_for(wrong)
    wrong = dict(good)
    wrong["trunk.0.weight"] = np.ones((4, 2, 3, 3), np.float32)         # only 3 -> 1 is an adaptation
    assert "trunk.0.weight has shape (4, 2, 3, 3), expected (4, 1, 3, 3)" in error_for(wrong)
    wrong = dict(good)
    wrong["head.0.weight"] = np.ones((1000, 9), np.float32)             # another feature width: not a head swap
    assert "head.0.weight has shape (1000, 9), expected (14, 8)" in error_for(wrong)
    wrong = dict(good)
    wrong["trunk.1.running_mean"] = np.ones(4, np.int64)
    assert "trunk.1.running_mean has dtype int64" in error_for(wrong)

    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DamagedFileError, match="bad.safetensors: not a readable safetensors file"):
        read_weights(tmp_path / "bad.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(bf16_file(np.array([1.0, -2.5, 3.0, 0.5], np.float32))[:-2])
    with pytest.raises(DamagedFileError, match="cut.safetensors: w: the file ends inside this array"):
        read_weights(tmp_path / "cut.safetensors")
    (tmp_path / "w.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="expected a .safetensors file or a chexcy .npz checkpoint"):
        read_weights(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors does not exist"):
        read_weights(tmp_path / "nowhere.safetensors")


def test_train_init_from_starts_from_the_adapted_weights(tmp_path, rng):
    """fit(init_from=...) trains from the file's weights: with a learning rate far below float32's resolution
    the parameters after an epoch are the file's (first conv summed, classifier fresh from the run's seed),
    and the adaptations are printed."""
    data = prepared("train", size=SIZE)
    imagenet = randomise(build_model("resnet", widths=[4, 8], in_channels=3, num_classes=1000, seed=1), rng)
    source = torch_like_file(tmp_path / "in1k.safetensors", imagenet)
    out = io.StringIO()
    fit(data, arch="resnet", width=4, depth=2, epochs=1, batch_size=64, lr=1e-30, seed=5,
        checkpoint_dir=tmp_path / "run", init_from=tmp_path / "in1k.safetensors", out=out, log_every=0)
    printed = out.getvalue()
    assert f"--init-from {tmp_path / 'in1k.safetensors'}: trunk.0.weight: 3-channel first conv" in printed
    assert "re-initialised for 14 outputs" in printed
    trained = load_checkpoint(tmp_path / "run" / "last.npz").build_model()
    fresh = build_model("resnet", widths=[4, 8], seed=5)
    for name, p in trained.named_parameters():
        if name == "trunk.0.weight":
            want = source[name].sum(axis=1, keepdims=True)
        elif name.startswith("head."):
            want = dict(fresh.named_parameters())[name].data
        else:
            want = source[name]
        # A zero bias moves by lr * gradient ~ 1e-31: within 1e-25 of its fresh zeros; every other value stays.
        np.testing.assert_allclose(p.data, want, rtol=0, atol=1e-25 if name == "head.0.bias" else 0, err_msg=name)


def test_init_from_and_resume_together_is_refused(tmp_path):
    with pytest.raises(ValueError, match="give only one of them"):
        fit(prepared("train", size=SIZE), arch="simple", width=4, depth=2, epochs=1, resume=tmp_path / "x.npz",
            init_from=tmp_path / "w.safetensors", out=None)


def test_train_command_passes_init_from_and_names_a_misfit(tmp_path, rng, capsys):
    data = prepared("train", size=SIZE)
    wide = build_model("simple", widths=[8, 16])
    safetensors.numpy.save_file(dict(wide.state_dict()), str(tmp_path / "wide.safetensors"))
    status = cli.main(["train", "--data", data, "--arch", "simple", "--width", "4", "--depth", "2", "--epochs", "1",
                       "--init-from", str(tmp_path / "wide.safetensors"), "--checkpoint-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "trunk.0.weight has shape (8, 1, 3, 3), expected (4, 1, 3, 3)" in err
    assert not (tmp_path / "run" / "last.npz").exists()
    narrow = build_model("simple", widths=[4, 8])
    safetensors.numpy.save_file(dict(randomise(narrow, rng).state_dict()), str(tmp_path / "narrow.safetensors"))
    assert cli.main(["train", "--data", data, "--arch", "simple", "--width", "4", "--depth", "2", "--epochs", "1",
                     "--init-from", str(tmp_path / "narrow.safetensors"), "--log-every", "0"]) == 0
    assert "narrow.safetensors: weights loaded as they are" in capsys.readouterr().out


@pytest.mark.parametrize("arch,first_conv,head", [("resnet18", "conv1.weight", "fc"),
                                                  ("densenet121", "features.conv0.weight", "classifier")])
def test_torchvision_named_imagenet_file_loads_with_adaptations(arch, first_conv, head, tmp_path, rng):
    """What torchvision's ImageNet model saves (3 channels, 1000 classes, torchvision's names, int64
    num_batches_tracked), built here from chexcy's own network with in_channels=3 and num_classes=1000."""
    imagenet = build_model(arch, in_channels=3, num_classes=1000, seed=1)
    for m in imagenet.modules():          # non-trivial statistics: a swapped mean/var would show
        if isinstance(m, BatchNorm2d):
            m.running_mean[:] = rng.normal(0.0, 0.2, m.num_features)
            m.running_var[:] = rng.uniform(0.5, 2.0, m.num_features)
    state = torch_like_file(tmp_path / f"{arch}.safetensors", imagenet)
    if arch == "resnet18":
        assert {"conv1.weight", "bn1.num_batches_tracked", "layer2.0.downsample.1.running_mean",
                "fc.weight"} <= set(state)
    else:
        assert {"features.denseblock1.denselayer1.conv1.weight", "features.norm5.running_var",
                "classifier.bias"} <= set(state)
    assert state[first_conv].shape[1] == 3 and state[head + ".weight"].shape[0] == 1000
    model = build_model(arch, seed=2)
    fresh_head = {n: v for n, v in model.state_dict().items() if n.startswith(head + ".")}
    notes = init_from(model, tmp_path / f"{arch}.safetensors")
    assert any(n.startswith(f"{first_conv}: 3-channel first conv") for n in notes), notes
    assert any(f"classifier {head}.weight (1000, " in n and "re-initialised for 14 outputs" in n for n in notes)
    assert any("BatchNorm num_batches_tracked counter(s)" in n for n in notes), notes
    loaded = model.state_dict()
    for name, value in loaded.items():
        if name == first_conv:
            np.testing.assert_array_equal(value, state[name].sum(axis=1, keepdims=True))
        elif name in fresh_head:
            np.testing.assert_array_equal(value, fresh_head[name])
        else:
            np.testing.assert_array_equal(value, state[name], err_msg=name)
    model.eval()
    imagenet.eval()
    x = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
    # Everything up to the classifier: the gray model on x equals the RGB model on x repeated 3x.
    np.testing.assert_allclose(model.forward_cam(x)[1], imagenet.forward_cam(np.repeat(x, 3, axis=1))[1],
                               rtol=1e-4, atol=1e-5)


def test_train_init_from_torchvision_resnet18_file(tmp_path, capsys):
    """`chexcy train --arch resnet18 --init-from resnet18.safetensors` on an ImageNet-shaped file."""
    imagenet = build_model("resnet18", in_channels=3, num_classes=1000, seed=1)
    torch_like_file(tmp_path / "resnet18.safetensors", imagenet)
    done = cli.main(["train", "--data", prepared("train", size=32, limit=16), "--arch", "resnet18", "--epochs", "1",
                     "--batch-size", "16", "--init-from", str(tmp_path / "resnet18.safetensors"),
                     "--checkpoint-dir", str(tmp_path / "run"), "--log-every", "0"])
    assert done == 0
    assert "conv1.weight: 3-channel first conv (64, 3, 7, 7) summed" in capsys.readouterr().out
    trained = load_checkpoint(tmp_path / "run" / "last.npz").model_state
    assert trained["conv1.weight"].shape == (64, 1, 7, 7) and trained["fc.weight"].shape == (14, 512)
