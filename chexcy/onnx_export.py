"""`chexcy export --onnx`: a chexcy model as an ONNX graph of standard operators, for onnxruntime & co.

The graph is built with the `onnx` package's helper API (optional extra `chexcy[onnx]`; the model file is
plain protobuf, so running it needs only an ONNX runtime, not chexcy). It computes the model in eval mode:
BatchNorm with its running statistics (ONNX's inference-form BatchNormalization), Dropout as identity.

One emitter per layer class, kept in `EMITTERS`: ``emit(graph, layer, name, x) -> y`` adds the nodes that
compute `layer` on the tensor named `x` and returns the name of its output; `name` is the layer's path in
the state dict (e.g. "trunk.3"), used to name its weights in the graph. `emit_module` looks the class up
(walking the class's bases, so a subclass reuses its parent's emitter unless it registers its own), so a
new layer type is one function plus one `@emitter(LayerClass)` line.

Inputs: "image" float32 (batch, 1, S, S) for image models; for multiview "frontal", "lateral" (batch, 1,
S, S), "has_frontal", "has_lateral" (batch,) float32 0/1 and "tabular" (batch, 2) float32 [age / 100,
male]. Pixels are normalised as chexcy does it: (uint8 value - 128) / 64 (chexcy.data.normalize); the
metadata says so. Output: "logits" (batch, 14), or "probabilities" (sigmoid of them) with
probabilities=True. The batch axis is dynamic, the image size fixed to the checkpoint's.
"""
import json

import numpy as np

from chexcy.nn.densenet import DenseBlock, DenseLayer, DenseNetFeatures, Transition
from chexcy.nn.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear,
                              MaxPool2d, ReLU, ResidualBlock)
from chexcy.nn.models import ImageClassifier, MultiViewNet
from chexcy.nn.module import Sequential
from chexcy.nn.resnet import ImageNetStyleClassifier, ResNetFeatures, _Block

OPSET = 17
BATCH = "batch"                 # the name of the dynamic batch dimension

EMITTERS = {}


def emitter(layer_class):
    """Register `fn(graph, layer, name, x) -> y` as the ONNX emitter of `layer_class`."""
    def register(fn):
        EMITTERS[layer_class] = fn
        return fn
    return register


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx package: pip install onnx "
                           "(or pip install '.[onnx]' in a chexcy clone)") from None
    return onnx


class Graph:
    """Nodes and initializers collected while emitting; names are unique by construction."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.initializers = [], []
        self._names = set()

    def reserve(self, name):
        """Claim `name` (a graph input) so no node output takes it."""
        self._names.add(name)
        return name

    def fresh(self, hint):
        name, k = hint, 1
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def constant(self, name, array):
        """Add `array` as an initializer called (a fresh variant of) `name`; returns the name."""
        name = self.fresh(name)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op_type, inputs, hint, n_outputs=1, **attributes):
        """Add one node; returns its output name (or the list of names when n_outputs > 1)."""
        outputs = [self.fresh(hint if n_outputs == 1 else f"{hint}_{i}") for i in range(n_outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outputs, name=outputs[0],
                                                     **attributes))
        return outputs[0] if n_outputs == 1 else outputs


def emit_module(graph, layer, name, x):
    """Emit `layer` (any chexcy Module with a registered emitter) applied to tensor `x`; returns y."""
    for cls in type(layer).__mro__:
        if cls in EMITTERS:
            return EMITTERS[cls](graph, layer, name, x)
    raise ValueError(f"ONNX export: no emitter for layer {type(layer).__name__} at {name or 'the model'!r}; "
                     f"exportable layers: {', '.join(sorted(c.__name__ for c in EMITTERS))}")


def _join(prefix, child):
    return f"{prefix}.{child}" if prefix else child


def _emit_children(graph, parent, name, x, children):
    """Emit `children` (modules of `parent`, in the order they compute) one after the other, each named by
    its attribute name in `parent`, so initializers carry the state-dict names."""
    names = {id(child): child_name for child_name, child in parent.named_children()}
    for child in children:
        x = emit_module(graph, child, _join(name, names[id(child)]), x)
    return x


# -- layers ---------------------------------------------------------------------------------------------
@emitter(Conv2d)
def _conv(graph, layer, name, x):
    if layer.padding == "same":             # odd total padding: the extra row/column at the bottom/right
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        begin = [t // 2 for t in totals]
        pads = begin + [t - b for t, b in zip(totals, begin)]
    else:
        pads = list(layer.padding) * 2
    inputs = [x, graph.constant(_join(name, "weight"), layer.weight.data)]
    if layer.bias is not None:
        inputs.append(graph.constant(_join(name, "bias"), layer.bias.data))
    return graph.node("Conv", inputs, _join(name, "conv"), kernel_shape=list(layer.kernel_size),
                      strides=list(layer.stride), pads=pads, dilations=list(layer.dilation), group=layer.groups)


@emitter(BatchNorm2d)
def _batch_norm(graph, layer, name, x):
    inputs = [x] + [graph.constant(_join(name, part), array) for part, array in
                    (("weight", layer.weight.data), ("bias", layer.bias.data),
                     ("running_mean", layer.running_mean), ("running_var", layer.running_var))]
    return graph.node("BatchNormalization", inputs, _join(name, "bn"), epsilon=layer.eps)


@emitter(ReLU)
def _relu(graph, layer, name, x):
    return graph.node("Relu", [x], _join(name, "relu"))


@emitter(MaxPool2d)
def _max_pool(graph, layer, name, x):
    # ONNX MaxPool ignores padded cells, the same as chexcy's -inf padding.
    return graph.node("MaxPool", [x], _join(name, "maxpool"), kernel_shape=list(layer.kernel_size),
                      strides=list(layer.stride), pads=list(layer.padding) * 2, dilations=list(layer.dilation))


@emitter(AvgPool2d)
def _avg_pool(graph, layer, name, x):
    return graph.node("AveragePool", [x], _join(name, "avgpool"), kernel_shape=list(layer.kernel_size),
                      strides=list(layer.stride), pads=list(layer.padding) * 2,
                      count_include_pad=int(layer.count_include_pad))


@emitter(GlobalAvgPool2d)
def _global_avg_pool(graph, layer, name, x):
    pooled = graph.node("GlobalAveragePool", [x], _join(name, "gap"))       # (N, C, 1, 1)
    return graph.node("Flatten", [pooled], _join(name, "flatten"), axis=1)  # (N, C), as chexcy's layer


@emitter(Flatten)
def _flatten(graph, layer, name, x):
    return graph.node("Flatten", [x], _join(name, "flatten"), axis=1)


@emitter(Linear)
def _linear(graph, layer, name, x):
    inputs = [x, graph.constant(_join(name, "weight"), layer.weight.data)]
    if layer.bias is not None:
        inputs.append(graph.constant(_join(name, "bias"), layer.bias.data))
    return graph.node("Gemm", inputs, _join(name, "gemm"), transB=1)       # x @ W.T + b


@emitter(Dropout)
def _dropout(graph, layer, name, x):
    return x                                   # identity at inference


@emitter(Sequential)
def _sequential(graph, layer, name, x):
    for child_name, child in layer.named_children():
        x = emit_module(graph, child, _join(name, child_name), x)
    return x


@emitter(ResidualBlock)
def _residual_block(graph, layer, name, x):
    branch = emit_module(graph, layer.branch, _join(name, "branch"), x)
    shortcut = x if layer.shortcut is None else emit_module(graph, layer.shortcut, _join(name, "shortcut"), x)
    total = graph.node("Add", [branch, shortcut], _join(name, "add"))
    return emit_module(graph, layer.relu, _join(name, "relu"), total)


@emitter(_Block)
def _torchvision_block(graph, block, name, x):
    """BasicBlock / Bottleneck: relu_out(branch(x) + (downsample(x) or x))."""
    branch = _emit_children(graph, block, name, x, block._branch_layers())
    shortcut = x if block.downsample is None else emit_module(graph, block.downsample, _join(name, "downsample"), x)
    return emit_module(graph, block.relu_out, _join(name, "relu_out"),
                       graph.node("Add", [branch, shortcut], _join(name, "add")))


@emitter(ResNetFeatures)
def _resnet_features(graph, features, name, x):
    return _emit_children(graph, features, name, x, ResNetFeatures._stages(features))


@emitter(DenseLayer)
def _dense_layer(graph, layer, name, x):
    """norm1 relu conv1 norm2 relu2 conv2 on x, the concatenation of the block's input and earlier layers."""
    y = emit_module(graph, layer.norm1, _join(name, "norm1"), x)
    y = graph.node("Relu", [y], _join(name, "relu1"))
    return _emit_children(graph, layer, name, y, (layer.conv1, layer.norm2, layer.relu2, layer.conv2))


@emitter(DenseBlock)
def _dense_block(graph, block, name, x):
    """Each layer reads the Concat of the block input and every earlier layer's output (channel axis)."""
    outputs = [x]
    for child_name, layer in block.named_children():
        inputs = outputs[0] if len(outputs) == 1 else graph.node("Concat", outputs, _join(name, f"cat_{child_name}"),
                                                                 axis=1)
        outputs.append(emit_module(graph, layer, _join(name, child_name), inputs))
    return graph.node("Concat", outputs, _join(name, "cat"), axis=1)


@emitter(Transition)
def _transition(graph, transition, name, x):
    # chexcy pools before the 1x1 conv (the same function as conv then pool: both linear, on different axes).
    return _emit_children(graph, transition, name, x,
                          (transition.norm, transition.relu, transition.pool, transition.conv))


@emitter(DenseNetFeatures)
def _densenet_features(graph, features, name, x):
    return _emit_children(graph, features, name, x, (features.features, features.relu))


@emitter(ImageNetStyleClassifier)
def _imagenet_style_classifier(graph, model, name, x):
    """resnet18/34/50, densenet121: the feature extractor's emitter on the model itself, then avgpool and the
    head named "fc" or "classifier" (dropout is identity at inference)."""
    x = EMITTERS[model._features](graph, model, name, x)
    x = emit_module(graph, model.avgpool, _join(name, "avgpool"), x)
    return emit_module(graph, model._head(), _join(name, model._head_name), x)


@emitter(ImageClassifier)
def _image_classifier(graph, model, name, x):
    x = emit_module(graph, model.trunk, _join(name, "trunk"), x)
    x = emit_module(graph, model.pool, _join(name, "pool"), x)
    return emit_module(graph, model.head, _join(name, "head"), x)


def _multiview(graph, model, name, frontal, lateral, has_frontal, has_lateral, tabular):
    """MultiViewNet.forward in standard operators. In eval mode every image's features depend on that image
    alone, so the trunk runs on all rows and a view's features are replaced by zeros where its has_* is not
    > 0 (Where, not a multiplication, so whatever a missing view's pixels hold cannot leak in)."""
    axes = graph.constant(_join(name, "axis1"), np.array([1], np.int64))
    zero = graph.constant(_join(name, "zero"), np.zeros((), np.float32))
    column = {flag: graph.node("Unsqueeze", [flag, axes], f"{flag}_column") for flag in (has_frontal, has_lateral)}

    def present(flag):                          # (batch,) -> bool (batch, 1): has_* > 0, as chexcy tests it
        return graph.node("Greater", [column[flag], zero], f"{flag}_present")

    if model.shared:                            # one trunk over [frontal; lateral], like chexcy's forward
        both = graph.node("Concat", [frontal, lateral], _join(name, "views"), axis=0)
        feats = emit_module(graph, model.pool_frontal, _join(name, "pool_frontal"),
                            emit_module(graph, model.frontal_trunk, _join(name, "frontal_trunk"), both))
        feat_f, feat_l = graph.node("Split", [feats], _join(name, "view_features"), n_outputs=2, axis=0)
    else:
        feat_f = emit_module(graph, model.pool_frontal, _join(name, "pool_frontal"),
                             emit_module(graph, model.frontal_trunk, _join(name, "frontal_trunk"), frontal))
        feat_l = emit_module(graph, model.pool_lateral, _join(name, "pool_lateral"),
                             emit_module(graph, model.lateral_trunk, _join(name, "lateral_trunk"), lateral))
    zeros = graph.constant(_join(name, "no_view"), np.zeros((1, model.width), np.float32))
    feat_f = graph.node("Where", [present(has_frontal), feat_f, zeros], "frontal_features")
    feat_l = graph.node("Where", [present(has_lateral), feat_l, zeros], "lateral_features")
    flags = graph.node("Concat", [column[has_frontal], column[has_lateral]], "view_flags", axis=1)
    fused = graph.node("Concat", [feat_f, feat_l, flags, tabular], "fused", axis=1)
    return emit_module(graph, model.fusion, _join(name, "fusion"), fused)


# -- the model ------------------------------------------------------------------------------------------
def _image_input(onnx, name, image_size, channels):
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [BATCH, channels, image_size, image_size])


def build_onnx_model(model, image_size, probabilities=False, metadata=None):
    """An onnx.ModelProto computing `model` (a chexcy model, exported as in eval mode) on image_size^2 inputs.

    probabilities: end with Sigmoid (output "probabilities") instead of raw "logits".
    metadata: extra str -> str entries for metadata_props (the label names are always there, as JSON).
    """
    onnx = _import_onnx()
    from chexcy.data.schema import LABELS
    graph = Graph(onnx)
    channels = int(model.config.get("in_channels", 1))
    if isinstance(model, MultiViewNet):
        inputs = [_image_input(onnx, "frontal", image_size, channels),
                  _image_input(onnx, "lateral", image_size, channels),
                  onnx.helper.make_tensor_value_info("has_frontal", onnx.TensorProto.FLOAT, [BATCH]),
                  onnx.helper.make_tensor_value_info("has_lateral", onnx.TensorProto.FLOAT, [BATCH]),
                  onnx.helper.make_tensor_value_info("tabular", onnx.TensorProto.FLOAT, [BATCH, 2])]
        y = _multiview(graph, model, "", *(graph.reserve(value.name) for value in inputs))
    else:
        inputs = [_image_input(onnx, "image", image_size, channels)]
        y = emit_module(graph, model, "", graph.reserve("image"))
    output_name = "probabilities" if probabilities else "logits"
    graph.nodes.append(onnx.helper.make_node("Sigmoid" if probabilities else "Identity", [y], [output_name],
                                             name=output_name))
    num_classes = int(model.config.get("num_classes", len(LABELS)))
    output = onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, [BATCH, num_classes])
    onnx_graph = onnx.helper.make_graph(graph.nodes, f"chexcy_{model.arch}", inputs, [output],
                                        initializer=graph.initializers)
    proto = onnx.helper.make_model(onnx_graph, producer_name="chexcy",
                                   opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    from chexcy import __version__
    proto.producer_version = __version__
    proto.ir_version = min(proto.ir_version, 8)        # IR 8 = opset 17's: loadable by older runtimes too
    proto.doc_string = (f"chexcy {model.arch} model: {num_classes} {output_name} for chest X-rays. Input pixels: "
                        "8-bit grayscale, resized and centre-cropped like chexcy's load_image, normalised as "
                        "(value - 128) / 64.")
    props = {"labels": json.dumps(list(LABELS[:num_classes])), "arch": model.arch,
             "model_config": json.dumps(model.config, sort_keys=True), "image_size": str(int(image_size)),
             "pixel_normalization": "(uint8 - 128) / 64", "output": output_name}
    props.update(metadata or {})
    onnx.helper.set_model_props(proto, props)
    return proto


def export_onnx(checkpoint, path, probabilities=False):
    """Write the model of `checkpoint` (a path or chexcy.checkpoint.Checkpoint) to `path` as ONNX, after
    onnx.checker's full check. Returns the onnx.ModelProto."""
    onnx = _import_onnx()
    from chexcy.checkpoint import Checkpoint, load_checkpoint
    from chexcy.fileio import atomic_write_bytes
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = ckpt.build_model()
    metadata = {}
    if "policy" in ckpt.config:
        metadata["label_policy"] = json.dumps(ckpt.config["policy"], sort_keys=True)
    proto = build_onnx_model(model, ckpt.image_size, probabilities, metadata)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return proto
