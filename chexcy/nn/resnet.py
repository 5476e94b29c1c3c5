"""ResNet-18/34/50 with torchvision's structure and parameter names, for chest X-rays.

Legend: N batch, C channels, H W height width. Activations NCHW float32.

    model = build_model("resnet50", in_channels=1, num_classes=14)
    model.state_dict()      # conv1.weight, bn1.running_mean, layer2.0.downsample.0.weight, ..., fc.bias

The network (He et al. 2016, torchvision's "v1.5" variant with the stride on the 3x3 conv):
conv1 7x7 stride 2 pad 3 -> bn1 -> relu -> maxpool 3x3 stride 2 pad 1 -> layer1..layer4 (64, 128, 256,
512 planes; stride 2 from layer2 on) -> global average pool -> fc. A 224x224 input gives a 7x7 last
feature map (stride 32). Every name that holds parameters or buffers is torchvision's, so weights move
between the two with plain arrays (BatchNorm's num_batches_tracked is not kept).

Initialisation as torchvision's: convs He-normal on fan_out (F * KH * KW), BatchNorm weight 1 and bias 0,
fc PyTorch's Linear default U(-1/sqrt(D), 1/sqrt(D)) for weight and bias.
"""
import numpy as np

from chexcy.nn.fold import FoldedPairs, run_chain
from chexcy.nn.init import default_generator, he_normal, uniform_fan_in
from chexcy.nn.layers import BatchNorm2d, Conv2d, Dropout, GlobalAvgPool2d, Linear, MaxPool2d, ReLU
from chexcy.nn.module import Module, Sequential

from chexcy.data.schema import NUM_CLASSES


def _conv(in_channels, out_channels, kernel_size, stride, padding, rng):
    """A bias-free conv initialised like torchvision's ResNet: N(0, 2 / fan_out)."""
    conv = Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False, rng=rng)
    kh, kw = conv.kernel_size
    conv.weight.data = he_normal(conv.weight.shape, out_channels * kh * kw, rng)
    return conv


def _downsample(in_channels, out_channels, stride, rng):
    """The shortcut of a block whose shape changes: conv1x1(stride) -> BN, named "0" and "1"."""
    return Sequential(_conv(in_channels, out_channels, 1, stride, 0, rng), BatchNorm2d(out_channels))


class _Block(Module):
    """What basic and bottleneck blocks share: out = relu(branch(x) + shortcut(x)).

    Memory: the sum is formed in place in the branch's last BatchNorm output (a fresh array that BN does
    not keep) and the final ReLU runs in place on it, so a block holds no activation beyond what its
    layers need for backward. Backward needs no copy of the incoming gradient either: BatchNorm backward
    only reads its dout, so the same array feeds the branch's last BN and the shortcut.

    Eval mode: every conv and the BatchNorm after it run as one convolution (chexcy.nn.fold), which
    removes the BatchNorm's NumPy passes over the activations; the branch's last one also takes the sum
    with the shortcut and the final ReLU (the shortcut is computed first for that).
    """
    expansion = 1

    def _branch_layers(self):   # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        self._folded.clear()
        skip = x if self.downsample is None else run_chain(self.downsample.layers, x, self._folded)
        return run_chain(self._branch_layers(), x, self._folded, residual=skip, relu=self.relu_out)

    def backward(self, dout):
        self._folded.restore()                           # after a folded eval forward: the layers' caches
        d = self.relu_out.backward(dout)                 # in place on dout; d is now ours to read
        dx = d
        for layer in reversed(self._branch_layers()):
            dx = layer.backward(dx)                      # the first step (BN) leaves d untouched
        dx += d if self.downsample is None else self.downsample.backward(d)
        return dx


class BasicBlock(_Block):
    """conv3x3(stride) bn1 relu conv3x3 bn2, plus identity or downsample, then ReLU (resnet18/34).

    x (N, C, H, W) -> (N, planes, ceil(H / stride), ceil(W / stride)). `relu` is torchvision's module
    (after bn1); `relu_out` is the ReLU after the sum, which torchvision runs with the same module.
    """
    expansion = 1

    def __init__(self, in_channels, planes, stride=1, rng=None):
        rng = rng if rng is not None else default_generator()
        self.conv1 = _conv(in_channels, planes, 3, stride, 1, rng)
        self.bn1 = BatchNorm2d(planes)
        self.relu = ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3, 1, 1, rng)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = (_downsample(in_channels, planes, stride, rng)
                           if stride != 1 or in_channels != planes else None)
        self.relu_out = ReLU(inplace=True)
        self.stride = stride
        self._folded = FoldedPairs()

    def _branch_layers(self):
        return (self.conv1, self.bn1, self.relu, self.conv2, self.bn2)


class Bottleneck(_Block):
    """conv1x1 bn1 relu conv3x3(stride) bn2 relu conv1x1(x4) bn3, plus identity or downsample, then ReLU.

    x (N, C, H, W) -> (N, 4 * planes, ceil(H / stride), ceil(W / stride)) (resnet50). The stride sits on
    the 3x3 conv, as in torchvision. `relu` follows bn1, `relu2` bn2, `relu_out` the sum (torchvision
    reuses one module for all three).
    """
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, rng=None):
        rng = rng if rng is not None else default_generator()
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 1, 1, 0, rng)
        self.bn1 = BatchNorm2d(planes)
        self.relu = ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3, stride, 1, rng)
        self.bn2 = BatchNorm2d(planes)
        self.relu2 = ReLU(inplace=True)
        self.conv3 = _conv(planes, out_channels, 1, 1, 0, rng)
        self.bn3 = BatchNorm2d(out_channels)
        self.downsample = (_downsample(in_channels, out_channels, stride, rng)
                           if stride != 1 or in_channels != out_channels else None)
        self.relu_out = ReLU(inplace=True)
        self.stride = stride
        self._folded = FoldedPairs()

    def _branch_layers(self):
        return (self.conv1, self.bn1, self.relu, self.conv2, self.bn2, self.relu2, self.conv3, self.bn3)


# depth -> (block, blocks per stage), torchvision's table
RESNET_LAYERS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNetFeatures(Module):
    """The convolutional part: conv1 bn1 relu maxpool layer1..layer4 (relu run after maxpool: the same). x (N, C, H, W) -> the last feature
    map (N, out_channels, ~H/32, ~W/32), out_channels 512 (resnet18/34) or 2048 (resnet50).

    width: channels of conv1 and layer1's planes, doubled per stage (torchvision's 64; smaller values
    give the small instances the tests check, with torchvision's names but smaller shapes).

    Also the trunk `multiview` uses for backbone "resnet18", "resnet34" or "resnet50".
    """

    def __init__(self, depth=18, in_channels=1, width=64, rng=None):
        if depth not in RESNET_LAYERS:
            raise ValueError(f"resnet: depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
        if int(in_channels) < 1:
            raise ValueError(f"resnet: in_channels must be >= 1, got {in_channels!r}")
        if int(width) < 1:
            raise ValueError(f"resnet: width must be >= 1, got {width!r}")
        width = int(width)
        rng = rng if rng is not None else default_generator()
        block, counts = RESNET_LAYERS[depth]
        self.conv1 = _conv(int(in_channels), width, 7, 2, 3, rng)
        self.bn1 = BatchNorm2d(width)
        self.relu = ReLU(inplace=True)
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        prev = width
        for stage, count in enumerate(counts):
            planes = width * 2 ** stage
            blocks = []
            for b in range(count):
                blocks.append(block(prev, planes, stride=2 if stage > 0 and b == 0 else 1, rng=rng))
                prev = planes * block.expansion
            setattr(self, f"layer{stage + 1}", Sequential(blocks))
        self.out_channels = prev
        self._folded = FoldedPairs()

    def _stages(self):
        # maxpool before relu: the same function with the same gradients (max-pooling and ReLU commute,
        # padding included, see chexcy.nn.models.simple_trunk), while the ReLU and its saved output shrink
        # to the pooled map, a quarter of the 112x112 one at 224 px.
        return (self.conv1, self.bn1, self.maxpool, self.relu, self.layer1, self.layer2, self.layer3, self.layer4)

    def forward(self, x):
        # eval mode: conv1 and bn1 as one convolution (chexcy.nn.fold)
        self._folded.clear()
        return run_chain(self._stages(), x, self._folded)

    def backward(self, dout):
        self._folded.restore()
        for layer in reversed(self._stages()):
            dout = layer.backward(dout)
        return dout


class ImageNetStyleClassifier:
    """Mix-in for a feature extractor class F: the model is F -> global average pool -> [dropout] -> the
    linear layer named by `_head_name` ("fc" or "classifier"). Gives the model interface of
    chexcy.nn.models (forward, backward, forward_batch, forward_cam, backward_cam, predict_images)."""
    input_kind = "image"
    _head_name = "fc"
    _features = None          # the feature extractor class, whose forward/backward give the last map

    def _head(self):
        return getattr(self, self._head_name)

    def _attach_head(self, features, num_classes, dropout, rng, bias_init="uniform"):
        if int(num_classes) < 1:
            raise ValueError(f"{self.arch}: num_classes must be >= 1, got {num_classes!r}")
        self.avgpool = GlobalAvgPool2d()
        self.dropout = Dropout(dropout) if dropout > 0 else None
        head = Linear(features, int(num_classes), rng=rng)
        head.weight.data = uniform_fan_in(head.weight.shape, features, rng)
        head.bias.data = (uniform_fan_in(head.bias.shape, features, rng) if bias_init == "uniform"
                          else np.zeros(head.bias.shape, np.float32))
        setattr(self, self._head_name, head)

    def _head_forward(self, feature_map):
        h = self.avgpool.forward(feature_map)
        if self.dropout is not None:
            h = self.dropout.forward(h)
        return self._head().forward(h)

    def forward_cam(self, x):
        """x (N, C, S, S) -> (logits (N, classes), last feature map A (N, C', h, w))."""
        feature_map = self._features.forward(self, x)
        return self._head_forward(feature_map), feature_map

    def backward_cam(self, dlogits):
        """dlogits (N, classes) -> dA, the gradient with respect to the last feature map."""
        dh = self._head().backward(dlogits)
        if self.dropout is not None:
            dh = self.dropout.backward(dh)
        return self.avgpool.backward(dh)

    def forward(self, x):
        """x (N, in_channels, S, S) float32 -> logits (N, num_classes)."""
        return self.forward_cam(x)[0]

    def backward(self, dlogits):
        return self._features.backward(self, self.backward_cam(dlogits))

    def forward_batch(self, batch):
        return self.forward(batch.images)

    def predict_images(self, x, tabular=None):
        """Logits for images x (N, in_channels, S, S); `tabular` is ignored (image-only model)."""
        return self.forward(x)


class TorchvisionResNet(ImageNetStyleClassifier, ResNetFeatures):
    """ResNet of `depth` 18, 34 or 50 with torchvision's names; x (N, in_channels, S, S) -> (N, classes).

    dropout > 0 puts a Dropout before fc (not in torchvision; it holds no parameters, so the names stay).
    """
    _features = ResNetFeatures
    depth = None

    def __init__(self, in_channels=1, num_classes=NUM_CLASSES, dropout=0.0, seed=0, width=64):
        self.config = dict(in_channels=int(in_channels), num_classes=int(num_classes), dropout=float(dropout),
                           seed=int(seed), width=int(width))
        rng = np.random.default_rng(seed)
        ResNetFeatures.__init__(self, self.depth, in_channels, width, rng)
        self._attach_head(self.out_channels, num_classes, float(dropout), rng)


class ResNet18(TorchvisionResNet):
    arch, depth = "resnet18", 18


class ResNet34(TorchvisionResNet):
    arch, depth = "resnet34", 34


class ResNet50(TorchvisionResNet):
    arch, depth = "resnet50", 50
