"""Image classification models: the ResNet-vd family and its baselines."""

from models.resnet import ResNet, create_model, list_models, param_groups

__all__ = ["ResNet", "create_model", "list_models", "param_groups"]
