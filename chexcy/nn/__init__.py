"""Neural-network building blocks on `chexcy.ops`: layers, losses, models, initialisation.

    from chexcy import nn
    model = nn.build_model("simple", widths=[16, 32, 64, 128])
    logits = model.forward(x)                       # x (N, 1, S, S) float32 -> (N, 14)
    loss, dlogits = nn.bce_with_logits(logits, y)   # y (N, 14), NaN = no label
    model.backward(dlogits)                         # sets p.grad for p in model.parameters()
"""
from chexcy.nn.init import he_normal
from chexcy.nn.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear,
                              MaxPool2d, ReLU, ResidualBlock, kernels, use_kernels)
from chexcy.nn.losses import BCEWithLogitsLoss, bce_with_logits, sigmoid, softplus
from chexcy.nn.densenet import DenseBlock, DenseLayer, DenseNet, DenseNetFeatures, Transition
from chexcy.nn.models import (ARCHITECTURES, MultiViewNet, ResNet, SimpleCNN, build_model)
from chexcy.nn.resnet import BasicBlock, Bottleneck, ResNet18, ResNet34, ResNet50, ResNetFeatures
from chexcy.nn.module import Module, Parameter, Sequential

__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "Dropout", "Flatten", "GlobalAvgPool2d", "Linear", "MaxPool2d",
           "ReLU", "ResidualBlock", "Sequential", "Module", "Parameter", "BCEWithLogitsLoss", "bce_with_logits",
           "sigmoid", "softplus", "SimpleCNN", "ResNet", "MultiViewNet", "ARCHITECTURES", "build_model",
           "BasicBlock", "Bottleneck", "ResNetFeatures", "ResNet18", "ResNet34", "ResNet50",
           "DenseLayer", "DenseBlock", "Transition", "DenseNetFeatures", "DenseNet",
           "he_normal", "kernels", "use_kernels"]
