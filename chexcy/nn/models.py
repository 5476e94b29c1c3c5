"""The networks `chexcy train --arch` can build, and the registry that names them.

Every model has ``config`` (a JSON-able dict that rebuilds it with `build_model(arch, **config)`),
``arch`` (its registry name) and ``input_kind``: "image" (forward(x), x (N, 1, S, S) float32 -> logits
(N, 14)) or "study" (forward(frontal, lateral, has_frontal, has_lateral, tabular) -> (N, 14)).
`forward_batch(batch)` takes what the matching loader yields (chexcy.data Batch or StudyBatch), so the
training loop need not know which kind it drives.

For Grad-CAM every model also has `forward_cam(x)` -> (logits, feature map A (N, C, h, w)) and
`backward_cam(dlogits)` -> dA, the gradient of the logits with respect to the last convolutional map.

Architectures: "simple" (ref-cnn and its variants), "resnet" (a small residual CNN), "multiview" (a study's
views plus age and sex), and torchvision's "resnet18", "resnet34", "resnet50" (chexcy.nn.resnet) and
"densenet121" (chexcy.nn.densenet) with torchvision's parameter names.
"""
import numpy as np

from chexcy.nn.layers import (BatchNorm2d, Conv2d, Dropout, GlobalAvgPool2d, Linear, MaxPool2d, ReLU,
                              ResidualBlock)
from chexcy.nn.densenet import DenseNet, DenseNetFeatures
from chexcy.nn.module import Module, Sequential
from chexcy.nn.resnet import ResNet18, ResNet34, ResNet50, ResNetFeatures

NUM_CLASSES = 14


def _widths(widths):
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
    return widths


def simple_trunk(widths, in_channels, rng):
    """conv3x3(pad 1) ReLU maxpool2 per width, without the pool after the last: (N, C, S, S) ->
    (N, widths[-1], S / 2**(len-1), ...). With widths (16, 32, 64, 128) this is ref-cnn's trunk.

    The ReLU is applied after the pool: max-pooling and ReLU commute exactly (max(relu(a), relu(b)) =
    relu(max(a, b)), and the gradient reaches the same input element either way, or is 0 in both when
    the window's maximum is <= 0), so this is the same function with the same gradients, while the ReLU
    touches 4x fewer values. tests/test_nn_models.py checks the equality.
    """
    layers, prev = [], in_channels
    for i, width in enumerate(widths):
        layers.append(Conv2d(prev, width, 3, padding=1, rng=rng))
        if i < len(widths) - 1:
            layers.append(MaxPool2d(2))
        layers.append(ReLU(inplace=True))
        prev = width
    return Sequential(layers)


def resnet_trunk(widths, blocks, in_channels, rng):
    """stem conv3x3 BN ReLU maxpool2, then one stage of `blocks` residual blocks per width (stride 2 from
    the second stage on): (N, C, S, S) -> (N, widths[-1], S / 2**len(widths), ...)."""
    if blocks < 1:
        raise ValueError(f"resnet: blocks per stage must be >= 1, got {blocks}")
    layers = [Conv2d(in_channels, widths[0], 3, padding=1, bias=False, rng=rng), BatchNorm2d(widths[0]),
              ReLU(inplace=True), MaxPool2d(2)]
    prev = widths[0]
    for i, width in enumerate(widths):
        for b in range(blocks):
            layers.append(ResidualBlock(prev, width, stride=2 if (i > 0 and b == 0) else 1, rng=rng))
            prev = width
    return Sequential(layers)


class ImageClassifier(Module):
    """trunk (conv feature map) -> global average pool -> [dropout] -> linear(num_classes)."""
    input_kind = "image"

    def __init__(self, trunk, features, num_classes, dropout, rng):
        self.trunk = trunk
        self.pool = GlobalAvgPool2d()
        head = [Dropout(dropout)] if dropout > 0 else []
        self.head = Sequential(head + [Linear(features, num_classes, rng=rng, gain=1.0)])

    def forward(self, x):
        return self.head.forward(self.pool.forward(self.trunk.forward(x)))

    def backward(self, dlogits):
        return self.trunk.backward(self.pool.backward(self.head.backward(dlogits)))

    def forward_batch(self, batch):
        return self.forward(batch.images)

    def forward_cam(self, x):
        feature_map = self.trunk.forward(x)
        return self.head.forward(self.pool.forward(feature_map)), feature_map

    def backward_cam(self, dlogits):
        return self.pool.backward(self.head.backward(dlogits))

    def predict_images(self, x, tabular=None):
        """Logits for images x (N, 1, S, S); `tabular` is ignored (image-only model)."""
        return self.forward(x)


class SimpleCNN(ImageClassifier):
    """ref-cnn (DESIGN.md section 7) generalised: widths (16, 32, 64, 128) is exactly ref-cnn."""
    arch = "simple"

    def __init__(self, widths=(16, 32, 64, 128), in_channels=1, num_classes=NUM_CLASSES, dropout=0.0, seed=0):
        widths = _widths(widths)
        self.config = dict(widths=widths, in_channels=int(in_channels), num_classes=int(num_classes),
                           dropout=float(dropout), seed=int(seed))
        rng = np.random.default_rng(seed)
        super().__init__(simple_trunk(widths, in_channels, rng), widths[-1], num_classes, dropout, rng)


class ResNet(ImageClassifier):
    """Residual CNN: stem, residual stages with BatchNorm (one per width), pool, linear."""
    arch = "resnet"

    def __init__(self, widths=(16, 32, 64, 128), blocks=1, in_channels=1, num_classes=NUM_CLASSES, dropout=0.0,
                 seed=0):
        widths = _widths(widths)
        self.config = dict(widths=widths, blocks=int(blocks), in_channels=int(in_channels),
                           num_classes=int(num_classes), dropout=float(dropout), seed=int(seed))
        rng = np.random.default_rng(seed)
        super().__init__(resnet_trunk(widths, int(blocks), in_channels, rng), widths[-1], num_classes, dropout,
                         rng)


BACKBONES = ("simple", "resnet", "resnet18", "resnet34", "resnet50", "densenet121")   # multiview trunks


class MultiViewNet(Module):
    """A study's frontal and lateral views (either may be missing) plus age and sex -> 14 logits.

    Each present view goes through a trunk (`backbone` "simple", "resnet", or the feature extractor of
    "resnet18", "resnet34", "resnet50" or "densenet121", whose parameter names inside the trunk are
    torchvision's; `widths` and `blocks` shape only "simple" and "resnet"; one trunk for both views when
    `shared`, else one each) and a global average pool, giving W features per view (W = the trunk's last
    width: widths[-1], 512, 2048 or 1024; zeros when the view is missing). The fusion MLP sees [frontal W | lateral W | has_frontal | has_lateral | age/100 | male]:
    linear(2W + 4 -> hidden) ReLU dropout linear(hidden -> 14).

    A shared trunk runs once on the present frontal and lateral images stacked along the batch, so its
    layers keep one forward cache and BatchNorm never sees the all-zero stand-ins for missing views.
    """
    input_kind = "study"
    arch = "multiview"

    def __init__(self, backbone="simple", widths=(16, 32, 64, 128), blocks=1, shared=True, hidden=64,
                 dropout=0.2, in_channels=1, num_classes=NUM_CLASSES, seed=0):
        widths = _widths(widths)
        if backbone not in BACKBONES:
            raise ValueError(f"multiview: backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        self.config = dict(backbone=backbone, widths=widths, blocks=int(blocks), shared=bool(shared),
                           hidden=int(hidden), dropout=float(dropout), in_channels=int(in_channels),
                           num_classes=int(num_classes), seed=int(seed))
        rng = np.random.default_rng(seed)

        def make_trunk():
            if backbone == "simple":
                return simple_trunk(widths, in_channels, rng)
            if backbone == "resnet":
                return resnet_trunk(widths, int(blocks), in_channels, rng)
            if backbone == "densenet121":
                return DenseNetFeatures(in_channels, rng=rng)
            return ResNetFeatures(int(backbone[len("resnet"):]), in_channels, rng=rng)

        self.frontal_trunk = make_trunk()
        self.width = getattr(self.frontal_trunk, "out_channels", widths[-1])
        self.lateral_trunk = None if shared else make_trunk()
        self.pool_frontal, self.pool_lateral = GlobalAvgPool2d(), GlobalAvgPool2d()
        self.fusion = Sequential(Linear(2 * self.width + 4, hidden, rng=rng), ReLU(inplace=True),
                                 Dropout(dropout), Linear(hidden, num_classes, rng=rng, gain=1.0))
        self._cache = None

    @property
    def shared(self):
        return self.lateral_trunk is None

    def _run(self, trunk, pool, images):
        return pool.forward(trunk.forward(images))

    def forward(self, frontal, lateral, has_frontal, has_lateral, tabular):
        """frontal, lateral (B, 1, S, S); has_* (B,) 0/1; tabular (B, 2) -> logits (B, 14)."""
        batch = frontal.shape[0]
        dtype = frontal.dtype
        rows_f = np.flatnonzero(np.asarray(has_frontal) > 0)
        rows_l = np.flatnonzero(np.asarray(has_lateral) > 0)
        feat_f = np.zeros((batch, self.width), dtype)
        feat_l = np.zeros((batch, self.width), dtype)
        if self.shared:
            if len(rows_f) + len(rows_l):
                both = np.concatenate([frontal[rows_f], lateral[rows_l]])
                feats = self._run(self.frontal_trunk, self.pool_frontal, both)
                feat_f[rows_f], feat_l[rows_l] = feats[:len(rows_f)], feats[len(rows_f):]
        else:
            if len(rows_f):
                feat_f[rows_f] = self._run(self.frontal_trunk, self.pool_frontal, frontal[rows_f])
            if len(rows_l):
                feat_l[rows_l] = self._run(self.lateral_trunk, self.pool_lateral, lateral[rows_l])
        flags = np.stack([np.asarray(has_frontal, dtype), np.asarray(has_lateral, dtype)], axis=1)
        fused = np.concatenate([feat_f, feat_l, flags, np.asarray(tabular, dtype)], axis=1)
        self._cache = (rows_f, rows_l, frontal.shape, dtype)
        return self.fusion.forward(fused)

    def backward(self, dlogits):
        """-> (dfrontal, dlateral), zeros for missing views; sets .grad of every parameter."""
        rows_f, rows_l, image_shape, dtype = self._cache
        dfused = self.fusion.backward(dlogits)
        w = self.width
        dfeat_f, dfeat_l = dfused[:, :w], dfused[:, w:2 * w]
        dfrontal = np.zeros(image_shape, dtype)
        dlateral = np.zeros(image_shape, dtype)
        if self.shared:
            if len(rows_f) + len(rows_l):
                dfeats = np.ascontiguousarray(np.concatenate([dfeat_f[rows_f], dfeat_l[rows_l]]))
                dboth = self.frontal_trunk.backward(self.pool_frontal.backward(dfeats))
                dfrontal[rows_f], dlateral[rows_l] = dboth[:len(rows_f)], dboth[len(rows_f):]
        else:
            for trunk, pool, rows, dfeat, dimg in ((self.frontal_trunk, self.pool_frontal, rows_f, dfeat_f,
                                                    dfrontal),
                                                   (self.lateral_trunk, self.pool_lateral, rows_l, dfeat_l,
                                                    dlateral)):
                if len(rows):
                    dimg[rows] = trunk.backward(pool.backward(np.ascontiguousarray(dfeat[rows])))
                else:
                    # This trunk saw no image in the batch: its gradient is zero, not last step's.
                    for p in trunk.parameters():
                        p.grad = np.zeros_like(p.data)
        return dfrontal, dlateral

    def forward_batch(self, batch):
        return self.forward(batch.frontal, batch.lateral, batch.has_frontal, batch.has_lateral, batch.tabular)

    # Grad-CAM on a single image treated as a frontal view with unknown age and sex.
    def forward_cam(self, x, tabular=None):
        n = x.shape[0]
        tabular = np.full((n, 2), 0.5, x.dtype) if tabular is None else tabular
        feature_map = self.frontal_trunk.forward(x)
        feat_f = self.pool_frontal.forward(feature_map)
        flags = np.tile(np.array([[1.0, 0.0]], x.dtype), (n, 1))
        fused = np.concatenate([feat_f, np.zeros_like(feat_f), flags, np.asarray(tabular, x.dtype)], axis=1)
        return self.fusion.forward(fused), feature_map

    def backward_cam(self, dlogits):
        dfused = self.fusion.backward(dlogits)
        return self.pool_frontal.backward(np.ascontiguousarray(dfused[:, :self.width]))

    def predict_images(self, x, tabular=None):
        """Logits for single images (N, 1, S, S), each taken as a study with only a frontal view."""
        return self.forward_cam(x, tabular)[0]


TORCHVISION_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "densenet121")   # fixed structures
ARCHITECTURES = {"simple": SimpleCNN, "resnet": ResNet, "multiview": MultiViewNet, "resnet18": ResNet18,
                 "resnet34": ResNet34, "resnet50": ResNet50, "densenet121": DenseNet}


def build_model(arch, **config):
    """The model registered as `arch` (a key of ARCHITECTURES) built with keyword `config`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](**config)
    except TypeError as exc:
        raise TypeError(f"architecture {arch!r}: bad configuration {config}: {exc}") from None
