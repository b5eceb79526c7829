"""FCN R50-D8 as mmseg 0.x builds it for the SSL benchmark (PROTOCOLS.md §8, §12).

Backbone: torchvision's ResNet with `replace_stride_with_dilation=[False, True, True]`, the plain 7x7
stem the SSL checkpoints have. torchvision gives the first block of a dilated stage the previous
stage's dilation, which is mmseg's `contract_dilation=True` (dilation // 2) for dilations (1, 1, 2, 4)
and strides (1, 2, 1, 1): output stride 8, and the checkpoint's tensors load one to one.

Heads: mmseg's FCNHead. Each conv is a ConvModule (3x3 conv without bias, norm, ReLU; kaiming-normal
fan-out init); the decode head concatenates its input with the convs' output for one more ConvModule;
Dropout2d then a 1x1 classifier drawn from N(0, 0.01) with bias 0. The auxiliary head on layer3
trains only (its loss weighted 0.4) and is not used at inference. Inference is mmseg's `whole` or `slide`
mode (Cityscapes, PROTOCOLS.md §13), with the heads' `align_corners` for every resize of the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from densecl_bench.checkpoint import LoadedCheckpoint, build_trainable

NormLayer = Callable[[int], nn.Module]
DILATED_ARCHS = ("resnet50", "resnet101")  # Bottleneck nets: torchvision's BasicBlock refuses dilation > 1


D8 = (False, True, True)  # torchvision's replace_stride_with_dilation for output stride 8


class DilatedResNet(nn.Module):
    """ResNet stem + layer1..layer4 of a D8 torchvision ResNet (output stride 8); returns (layer3, layer4)."""

    def __init__(self, net: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return c3, self.layer4(c3)


def dilated_backbone_from_checkpoint(ckpt: LoadedCheckpoint, norm_layer: NormLayer = nn.BatchNorm2d) -> DilatedResNet:
    """The D8 ResNet holding every tensor of `ckpt`, loaded strictly by the loader every fine-tuning
    benchmark shares (`checkpoint.build_trainable`, behind `RunContext.trainable_backbone`)."""
    if ckpt.arch not in DILATED_ARCHS:
        raise ValueError(f"FCN-D8 needs a Bottleneck ResNet ({', '.join(DILATED_ARCHS)}), got {ckpt.arch!r}")
    return DilatedResNet(build_trainable(ckpt, norm_layer=norm_layer, replace_stride_with_dilation=D8))


def _conv_module(cin: int, cout: int, norm_layer: NormLayer) -> nn.Sequential:
    """mmcv ConvModule(3x3, norm, ReLU): no conv bias under a norm; kaiming-normal (fan-out, ReLU) init."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, norm_layer(cout), nn.ReLU(inplace=True))


class FCNHead(nn.Module):
    """mmseg FCNHead: `num_convs` ConvModules, optionally one over [input, convs], Dropout2d, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_convs: int, concat_input: bool, num_classes: int,
                 dropout: float = 0.1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(_conv_module(in_channels if i == 0 else channels, channels, norm_layer)
                                     for i in range(num_convs)))
        self.conv_cat = _conv_module(in_channels + channels, channels, norm_layer) if concat_input else None
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


class FCN(nn.Module):
    """Dilated ResNet + FCN decode head on layer4 (2 convs of 512, concat) + auxiliary head on layer3 (1 conv of 256).

    forward(images) -> {"seg": stride-8 logits} in eval mode, plus {"aux": ...} in training mode.
    """

    def __init__(self, backbone: DilatedResNet, num_classes: int = 21, decode_channels: int = 512,
                 aux_channels: int = 256, dropout: float = 0.1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = FCNHead(2048, decode_channels, 2, True, num_classes, dropout, norm_layer)
        self.auxiliary_head = FCNHead(1024, aux_channels, 1, False, num_classes, dropout, norm_layer)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        c3, c4 = self.backbone(images)
        out = {"seg": self.decode_head(c4)}
        if self.training:
            out["aux"] = self.auxiliary_head(c3)
        return out


def seg_loss(logits: Tensor, label: Tensor, ignore_index: int = 255, align_corners: bool = False) -> Tensor:
    """mmseg 0.x's decode loss: logits upsampled (bilinear, the head's `align_corners`) to the label size,
    per-pixel cross-entropy with ignored pixels contributing 0, averaged over ALL pixels
    (`avg_non_ignore=False`), not PyTorch's mean over the non-ignored ones."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(logits, label.long(), ignore_index=ignore_index, reduction="none").mean()


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg 0.x `slide_inference` along one axis: ceil((size - crop) / stride) + 1 windows at multiples of
    `stride`, the last shifted back to end at `size`; one window from 0 when the image is not larger than the
    crop (it then runs at the image's own size, unpadded)."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(k * stride + crop, size) - crop, 0) for k in range(count)]


@dataclass(frozen=True)
class SlideWindow:
    """`test_cfg=dict(mode='slide', crop_size=(h, w), stride=(h, w))`."""

    crop: tuple[int, int]
    stride: tuple[int, int]


def _decode(model: nn.Module, image: Tensor, align_corners: bool) -> Tensor:
    """mmseg `encode_decode`: the stride-8 logits resized (bilinear) to the network input."""
    logits = model(image)["seg"].float()
    return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=align_corners)


@torch.no_grad()
def predict(model: nn.Module, image: Tensor, original_size: tuple[int, int], align_corners: bool = False,
            window: SlideWindow | None = None) -> Tensor:
    """Inference on one resized image (1 x 3 x h x w): logits C x H x W at the original size.

    As mmseg 0.x with rescale: `whole` (window None) decodes the image at once; `slide` decodes each
    crop of the window grid (`window_starts` per axis), adds its logits into the image's frame and
    divides every pixel by the number of windows covering it. Either way the logits are then resized
    to the original image, bilinear with the heads' `align_corners`.
    """
    if window is None:
        logits = _decode(model, image, align_corners)
    else:
        (h, w), (ch, cw), (sh, sw) = image.shape[-2:], window.crop, window.stride
        logits, count = None, image.new_zeros(1, 1, h, w)
        for y in window_starts(h, ch, sh):
            for x in window_starts(w, cw, sw):
                crop = _decode(model, image[..., y : y + ch, x : x + cw], align_corners)
                if logits is None:
                    logits = crop.new_zeros(1, crop.shape[1], h, w)
                logits[..., y : y + ch, x : x + cw] += crop
                count[..., y : y + ch, x : x + cw] += 1
        logits = logits / count
    return F.interpolate(logits, size=original_size, mode="bilinear", align_corners=align_corners)[0]
