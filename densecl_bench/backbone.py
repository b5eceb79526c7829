"""ResNet backbone exposing the five feature maps the SSL transfer protocols probe.

feature1 = stem (conv1 + bn1 + ReLU, *before* max-pool), feature2..feature5 = layer1..layer4
(res2..res5). Definitions and pooling follow PROTOCOLS.md §2.2 (MMSelfSup 0.x `MultiPooling`,
FAIR `resnet_supervised_finetune_linear.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

LAYERS: tuple[str, ...] = ("feature1", "feature2", "feature3", "feature4", "feature5")
ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")

# AvgPool2d(kernel, stride, padding) per layer, for 224 px inputs (count_include_pad=True).
# ResNet-50 dims: 64*12*12=9216, 256*6*6=9216, 512*4*4=8192, 1024*3*3=9216, 2048*2*2=8192.
PROTOCOL_POOL: dict[str, tuple[int, int, int]] = {
    "feature1": (10, 10, 4),
    "feature2": (16, 8, 0),
    "feature3": (13, 5, 0),
    "feature4": (8, 3, 0),
    "feature5": (6, 1, 0),
}
# The output grid each protocol pooling produces at 224 px; the `adaptive` variant pools any
# input size to the same grid (used by the demo profile's small images), keeping the dims.
POOL_GRID: dict[str, int] = {"feature1": 12, "feature2": 6, "feature3": 4, "feature4": 3, "feature5": 2}


def parse_layers(spec: str | Sequence[str]) -> list[str]:
    """Parse `feature1-5`, `feature4,feature5`, `1-5` or a list into canonical layer names."""
    if not isinstance(spec, str):
        items = [str(s) for s in spec]
    else:
        items = [s.strip() for s in spec.split(",") if s.strip()]
    out: list[str] = []
    for item in items:
        body = item.removeprefix("feature")
        if "-" in body:
            lo, hi = body.split("-", 1)
            nums = range(int(lo.removeprefix("feature")), int(hi.removeprefix("feature")) + 1)
        else:
            nums = [int(body)]
        for n in nums:
            if not 1 <= n <= 5:
                raise ValueError(f"unknown layer {item!r}: expected feature1..feature5")
            name = f"feature{n}"
            if name not in out:
                out.append(name)
    return out


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier, returning feature1..feature5.

    Args:
        arch: one of `ARCHS`; the state-dict keys are torchvision's (conv1, bn1, layer1..4).
    """

    def __init__(self, arch: str = "resnet50") -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
        self.arch = arch
        net = getattr(torchvision.models, arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if arch in ("resnet50", "resnet101") else 1
        self.channels: dict[str, int] = {
            "feature1": 64,
            "feature2": 64 * expansion,
            "feature3": 128 * expansion,
            "feature4": 256 * expansion,
            "feature5": 512 * expansion,
        }

    def forward(self, x: Tensor, layers: Sequence[str] = LAYERS) -> dict[str, Tensor]:
        """Return the requested feature maps; stops after the deepest one asked for."""
        last = max(LAYERS.index(name) for name in layers)
        out: dict[str, Tensor] = {}
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        if last >= 1:
            x = self.maxpool(x)
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[:last]:
                x = stage(x)
                feats.append(x)
        for name in layers:
            out[name] = feats[LAYERS.index(name)]
        return out

    def pooled_dim(self, layer: str) -> int:
        """Flattened dim after protocol pooling (9216/9216/8192/9216/8192 for ResNet-50)."""
        return self.channels[layer] * POOL_GRID[layer] ** 2


def pool_feature(x: Tensor, layer: str, pooling: str = "protocol") -> Tensor:
    """Pool one feature map to a flat vector per sample.

    `protocol`: the fixed AvgPool2d kernels of PROTOCOLS.md §2.2 (224 px inputs).
    `adaptive`: adaptive average pooling to the same output grid, for other input sizes.
    `global`: global average pooling (kNN, AvgPool linear).
    """
    if pooling == "global":
        return x.mean(dim=(2, 3))
    if pooling == "protocol":
        k, s, p = PROTOCOL_POOL[layer]
        grid = POOL_GRID[layer]
        out = tuple((n + 2 * p - k) // s + 1 for n in x.shape[-2:])
        if out != (grid, grid):
            raise ValueError(
                f"{layer}: protocol pooling of a {tuple(x.shape[-2:])} map gives a {out} grid, expected "
                f"{grid}x{grid}; the protocol pooling needs 224 px inputs (use pooling 'adaptive' for other sizes)"
            )
        y = F.avg_pool2d(x, kernel_size=k, stride=s, padding=p, count_include_pad=True)
    elif pooling == "adaptive":
        y = F.adaptive_avg_pool2d(x, POOL_GRID[layer])
    else:
        raise ValueError(f"unknown pooling {pooling!r}: expected protocol, adaptive or global")
    return y.flatten(1)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: BN running statistics stay exactly as loaded."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def random_state_dict(arch: str = "resnet50", seed: int = 0) -> dict[str, Tensor]:
    """A seeded, randomly initialised backbone (torchvision's init): the `--ckpt random` row."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Backbone(arch).state_dict()
