"""Data around the models: the byte tokenizer, ImageNet preprocessing and labels, optical-flow helpers.

Pillow is imported only by the functions that read or write image files.
"""

from .flow import flow_model_fn, flow_to_color, normalize_frames, save_flow_png, tile_flow
from .image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetEvalTransform,
    ImageNetTrainTransform,
    imagenet_class_names,
    load_image,
    load_window,
)
from .jpeg import decode_jpeg
from .tokenizer import ByteTokenizer

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ByteTokenizer",
    "ImageNetEvalTransform",
    "ImageNetTrainTransform",
    "decode_jpeg",
    "flow_model_fn",
    "flow_to_color",
    "imagenet_class_names",
    "load_image",
    "load_window",
    "normalize_frames",
    "save_flow_png",
    "tile_flow",
]
