"""`chexcy export --onnx`: the graph passes onnx.checker's full check and onnxruntime computes what chexcy
computes (eval mode), for every architecture, at batch 1 and 7, with non-trivial BatchNorm statistics."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import chexcy
from chexcy import cli
from chexcy.checkpoint import load_checkpoint, save_checkpoint
from chexcy.data import LABELS, load_image, normalize
from chexcy.nn import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, Module, ReLU,
                       Sequential, build_model)
from chexcy.nn.models import ImageClassifier
from chexcy.onnx_export import EMITTERS, OPSET, build_onnx_model, export_onnx
from chexcy.predict import predict_files

SIZE = 32          # densenet121's four stages need >= 32 pixels (32 / 32 = one cell at the end)
# float32 through different summation orders (our kernels vs onnxruntime's MLAS) on logits of size ~1-10.
TOL = dict(rtol=1e-4, atol=1e-4)

ARCHS = [
    ("simple", dict(widths=[4, 8, 16])),
    ("simple", dict(widths=[4, 8], dropout=0.3)),
    ("resnet", dict(widths=[4, 8, 16], blocks=2)),
    ("resnet", dict(widths=[6, 6], blocks=1, dropout=0.5)),      # identity shortcuts in both stages
    ("multiview", dict(backbone="simple", widths=[4, 8], hidden=12)),
    ("multiview", dict(backbone="resnet", widths=[4, 8], hidden=12)),
    ("multiview", dict(backbone="resnet", widths=[4, 8], hidden=12, shared=False)),
    ("resnet18", dict()),                                           # torchvision's structures, full size
    ("resnet34", dict(width=4)),
    ("resnet50", dict(width=4, dropout=0.2)),
    ("densenet121", dict()),
    ("densenet121", dict(growth_rate=4, block_config=(2, 3, 2), num_init_features=8, bn_size=2)),
    ("multiview", dict(backbone="resnet18", hidden=12, shared=False)),
    ("multiview", dict(backbone="densenet121", hidden=12)),
]


def arch_id(case):
    arch, config = case
    return "-".join([arch] + [f"{k}={v}" for k, v in config.items()])


def randomise_batch_norm(model, rng):
    """Running statistics and affine parameters far from their (0, 1) defaults, so a wrong eps, a training-
    form BatchNormalization or a swapped mean/var would show."""
    count = 0
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            c = m.num_features
            m.running_mean[:] = rng.normal(0.0, 0.5, c)
            m.running_var[:] = rng.uniform(0.3, 3.0, c)
            m.weight.data[:] = rng.uniform(0.5, 1.5, c)
            m.bias.data[:] = rng.normal(0.0, 0.3, c)
            count += 1
    return count


def session(proto):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def study_inputs(rng, batch):
    """Multiview inputs with every combination of present/missing views; missing views hold garbage pixels,
    which must not reach the output (chexcy never looks at them)."""
    frontal = rng.normal(size=(batch, 1, SIZE, SIZE)).astype(np.float32)
    lateral = rng.normal(size=(batch, 1, SIZE, SIZE)).astype(np.float32)
    has_frontal = np.array([1, 0, 1, 1, 0, 1, 1][:batch], np.float32)
    has_lateral = np.array([0, 1, 1, 0, 0, 1, 1][:batch], np.float32)
    tabular = np.column_stack([rng.uniform(0.2, 0.9, batch), rng.integers(0, 2, batch)]).astype(np.float32)
    return dict(frontal=frontal, lateral=lateral, has_frontal=has_frontal, has_lateral=has_lateral, tabular=tabular)


@pytest.mark.parametrize("case", ARCHS, ids=arch_id)
def test_onnxruntime_equals_chexcy_for_every_architecture(case, rng, tmp_path):
    arch, config = case
    model = build_model(arch, seed=3, **config)
    has_batch_norm = arch != "simple" and config.get("backbone", "resnet") != "simple"
    assert (randomise_batch_norm(model, rng) > 0) == has_batch_norm
    path = save_checkpoint(tmp_path / "model.npz", model, config={"image_size": SIZE})
    proto = export_onnx(path, tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "model.onnx"), full_check=True)
    chexcy_model = load_checkpoint(path).build_model()          # rebuilt in eval mode, as predict does it
    sess = session(proto)
    for batch in (1, 7):
        if arch == "multiview":
            feeds = study_inputs(rng, batch)
            want = chexcy_model.forward(**feeds)
            if batch == 7:
                feeds["frontal"][feeds["has_frontal"] == 0] = np.nan    # absent views: never looked at
                feeds["lateral"][feeds["has_lateral"] == 0] = np.inf
        else:
            feeds = dict(image=rng.normal(size=(batch, 1, SIZE, SIZE)).astype(np.float32))
            want = chexcy_model.forward(feeds["image"])
        (got,) = sess.run(None, feeds)
        assert got.shape == (batch, len(LABELS))
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"{arch_id(case)} batch {batch}")
    if arch != "multiview":     # every weight in the graph under its state-dict (torchvision's) name
        assert {i.name for i in proto.graph.initializer} == set(model.state_dict())


def test_every_layer_emitter_matches_chexcy(rng):
    """Layers the architectures do not use yet (average pooling, 'same' padding with an even kernel, padded
    dilated max-pooling, Flatten, a conv with bias and groups) through the same emitters."""
    trunk = Sequential(Conv2d(1, 6, 2, padding="same", rng=rng), BatchNorm2d(6), ReLU(),
                       Conv2d(6, 6, 3, stride=2, padding=1, groups=3, rng=rng),
                       MaxPool2d(3, stride=1, padding=1, dilation=1), AvgPool2d(3, stride=2, padding=1),
                       AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
                       MaxPool2d(2, stride=2, padding=1, dilation=2), Dropout(0.4))
    model = ImageClassifier(trunk, 6, len(LABELS), 0.0, rng)
    model.head = Sequential(Flatten(), Linear(6, 10, rng=rng), ReLU(), Linear(10, len(LABELS), bias=False, rng=rng))
    model.config, model.arch = dict(in_channels=1, num_classes=len(LABELS)), "layers"
    randomise_batch_norm(model, rng)
    model.eval()
    used = {type(m) for m in model.modules()}
    assert {AvgPool2d, MaxPool2d, Flatten, Dropout, Conv2d, BatchNorm2d, Linear} <= used <= set(EMITTERS) | {
        ImageClassifier}
    proto = build_onnx_model(model, SIZE)
    onnx.checker.check_model(proto, full_check=True)
    x = rng.normal(size=(5, 1, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(session(proto).run(None, {"image": x})[0], model.forward(x), **TOL)


def test_graph_uses_standard_operators_and_names_inputs_outputs_labels(tmp_path):
    model = build_model("multiview", backbone="resnet", widths=[4, 8], hidden=8)
    path = save_checkpoint(tmp_path / "m.npz", model, config={"image_size": SIZE})
    proto = export_onnx(path, tmp_path / "m.onnx", probabilities=True)
    assert [o.domain for o in proto.opset_import] == [""] and proto.opset_import[0].version == OPSET >= 17
    ops_used = {n.op_type for n in proto.graph.node}
    assert ops_used <= {"Conv", "BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm",
                        "Add", "Concat", "Split", "Unsqueeze", "Greater", "Where", "Sigmoid"}, ops_used
    assert {"Conv", "BatchNormalization", "Add", "Gemm", "Sigmoid"} <= ops_used
    assert all(len(n.input) == 5 for n in proto.graph.node if n.op_type == "BatchNormalization")   # inference form
    assert [i.name for i in proto.graph.input] == ["frontal", "lateral", "has_frontal", "has_lateral", "tabular"]
    assert [o.name for o in proto.graph.output] == ["probabilities"]
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"            # dynamic batch axis
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["labels"]) == list(LABELS)
    assert props["arch"] == "multiview" and props["image_size"] == str(SIZE)
    dense = build_onnx_model(build_model("densenet121", growth_rate=4, block_config=(2, 2), num_init_features=8),
                             SIZE)
    assert {n.op_type for n in dense.graph.node} == {"Conv", "BatchNormalization", "Relu", "MaxPool", "Concat",
                                                     "AveragePool", "GlobalAveragePool", "Flatten", "Gemm",
                                                     "Identity"}


def test_export_command_writes_onnx_whose_probabilities_equal_predict(tmp_path):
    """`chexcy export --onnx --probabilities` end to end, against `chexcy predict`'s numbers on image files
    (load_image + normalize, then the model), for an image model and a multiview one."""
    rng = np.random.default_rng(5)
    files = []
    for i in range(3):
        pixels = rng.integers(0, 256, (30 + 7 * i, 40), dtype=np.uint8)
        files.append(str(tmp_path / f"x{i}.png"))
        Image.fromarray(pixels, mode="L").save(files[-1])
    x = normalize(np.stack([load_image(f, SIZE) for f in files]))
    for arch, config in (("resnet", dict(widths=[4, 8])), ("multiview", dict(widths=[4, 8], hidden=8))):
        model = build_model(arch, **config)
        randomise_batch_norm(model, rng)
        ckpt = save_checkpoint(tmp_path / f"{arch}.npz", model, config={"image_size": SIZE})
        out = tmp_path / f"{arch}.onnx"
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(chexcy.__file__))))
        done = subprocess.run([sys.executable, "-m", "chexcy", "export", str(ckpt), "--onnx", str(out),
                               "--probabilities"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"wrote {out}" in done.stderr
        want = np.array([probs for _, probs, _ in predict_files(ckpt, files)])
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        if arch == "multiview":     # predict scores a file as a study with only that frontal view, age/sex 0.5
            n = len(files)
            feeds = dict(frontal=x, lateral=np.zeros_like(x), has_frontal=np.ones(n, np.float32),
                         has_lateral=np.zeros(n, np.float32), tabular=np.full((n, 2), 0.5, np.float32))
        else:
            feeds = dict(image=x)
        np.testing.assert_allclose(sess.run(["probabilities"], feeds)[0], want, **TOL, err_msg=arch)


def test_export_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    model = build_model("simple", widths=[4])
    ckpt = save_checkpoint(tmp_path / "m.npz", model, config={"image_size": SIZE})
    assert cli.main(["export", str(ckpt)]) == 2
    assert "give --onnx FILE and/or --safetensors FILE" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing.npz"), "--onnx", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "missing.npz" in err and "does not exist" in err
    monkeypatch.setitem(sys.modules, "onnx", None)                  # import onnx -> ImportError
    assert cli.main(["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "pip install onnx" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.onnx")


def test_a_layer_without_emitter_is_named():
    class Mystery(Module):                   # a layer no emitter knows
        def forward(self, x):
            return x
    model = ImageClassifier(Sequential(Conv2d(1, 4, 3), Mystery()), 4, len(LABELS), 0.0, np.random.default_rng(0))
    model.config, model.arch = dict(in_channels=1), "mystery"
    with pytest.raises(ValueError, match=r"no emitter for layer Mystery at 'trunk.1'"):
        build_onnx_model(model, SIZE)
