"""Networks for distillation and evaluation: the ConvNet family, cross-architecture nets, flat-parameter calls.

`ResNet18` is imported on first access (it pulls in torchvision, which takes about 2 s to load).
"""

from fastdd.models.alexnet import AlexNet
from fastdd.models.convnet import ConvNet
from fastdd.models.functional import ParameterLayout, flat_parameters, functional_forward, parameter_layout
from fastdd.models.init import init_parameters
from fastdd.models.registry import MODELS, build_model, build_model_for
from fastdd.models.vgg import VGG11

__all__ = [
    "MODELS",
    "AlexNet",
    "ConvNet",
    "ParameterLayout",
    "ResNet18",
    "VGG11",
    "build_model",
    "build_model_for",
    "flat_parameters",
    "functional_forward",
    "init_parameters",
    "parameter_layout",
]


def __getattr__(name: str):
    if name == "ResNet18":
        from fastdd.models.resnet import ResNet18

        return ResNet18
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
