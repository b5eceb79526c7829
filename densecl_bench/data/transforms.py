"""The preprocessing of each protocol, scaled for the demo profile's small images.

Sizes are given for the protocol's 224 px; `size` rescales them (the demo uses 96 px),
keeping the protocol's ratios (resize = size * 256 / 224).
"""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_for(size: int) -> int:
    """The protocol resize (256 at 224 px) scaled to `size`."""
    return round(size * 256 / 224)


def normalize() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def voc_svm(size: int = 224) -> T.Compose:
    """PROTOCOLS.md §2.2: shorter side to 256, then squash the whole image to 224x224 (no crop)."""
    return T.Compose([T.Resize(resize_for(size)), T.Resize((size, size)), normalize()])


def center_crop(size: int = 224) -> T.Compose:
    """PROTOCOLS.md §4.2 test aug and §5 kNN: Resize 256 (shorter side), CenterCrop 224."""
    return T.Compose([T.Resize(resize_for(size)), T.CenterCrop(size), normalize()])


TRANSFORMS = {"voc_svm": voc_svm, "center_crop": center_crop}


def build(name: str, size: int = 224) -> T.Compose:
    """Build an evaluation transform by the name recorded in configs and cache keys."""
    try:
        return TRANSFORMS[name](size)
    except KeyError:
        raise ValueError(f"unknown transform {name!r}: expected one of {', '.join(TRANSFORMS)}") from None
