"""Teachers: the models whose embeddings the student regresses and whose text embeddings classify.

``Teacher`` is the interface; ``OpenCLIPTeacher`` wraps any open_clip model. open_clip is an
optional dependency, imported only when a teacher (or the ImageNet names/templates) is used.
"""
from .base import Teacher
from .dinov2 import DINOv2Teacher
from .openclip import OpenCLIPTeacher, RandomWeightsWarning, WeightsUnavailable, list_openclip_models
from .prompts import SINGLE_TEMPLATE, imagenet_classnames, resolve_classes, resolve_templates

__all__ = ["Teacher", "OpenCLIPTeacher", "DINOv2Teacher", "RandomWeightsWarning", "WeightsUnavailable",
           "list_openclip_models", "SINGLE_TEMPLATE", "imagenet_classnames", "resolve_classes",
           "resolve_templates"]
