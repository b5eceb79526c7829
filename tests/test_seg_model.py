"""FCN R50-D8: mmseg's dilation rule block by block, strict checkpoint loading, the heads and the 0.x loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densecl_bench.checkpoint import CheckpointError, load_checkpoint
from densecl_bench.segmentation.model import FCN, FCNHead, dilated_backbone_from_checkpoint, predict, seg_loss

# mmseg ResNet config of PROTOCOLS.md §8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation=True
MMSEG_STRIDES, MMSEG_DILATIONS, BLOCKS = (1, 2, 1, 1), (1, 1, 2, 4), (3, 4, 6, 3)


def mmseg_block(stage: int, block: int) -> tuple[int, int]:
    """(stride, dilation) of a block's 3x3 conv under mmseg's ResLayer: the first block of a stage takes the
    stage stride, and dilation // 2 when contract_dilation and dilation > 1; the others stride 1, full dilation."""
    d = MMSEG_DILATIONS[stage]
    if block == 0:
        return MMSEG_STRIDES[stage], d // 2 if d > 1 else d
    return 1, d


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return dilated_backbone_from_checkpoint(load_checkpoint("random"))


def test_blocks_equal_mmseg_dilations_strides_and_contract_dilation(backbone):
    for stage, layer in enumerate((backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)):
        assert len(layer) == BLOCKS[stage]
        for b, block in enumerate(layer):
            stride, dilation = mmseg_block(stage, b)
            assert block.conv2.stride == (stride, stride), (stage, b)
            assert block.conv2.dilation == (dilation, dilation), (stage, b)
            assert block.conv2.padding == (dilation, dilation), (stage, b)  # mmseg pads the 3x3 by its dilation
            assert block.conv1.stride == block.conv3.stride == (1, 1)  # style='pytorch': stride on the 3x3
            if b == 0:
                assert block.downsample[0].stride == (stride, stride)


def test_output_stride_8(backbone):
    c3, c4 = backbone.eval()(torch.randn(1, 3, 64, 48))
    assert c3.shape == (1, 1024, 8, 6) and c4.shape == (1, 2048, 8, 6)


def test_checkpoint_loads_strictly():
    ckpt = load_checkpoint("random", seed=3)
    model = dilated_backbone_from_checkpoint(ckpt)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt.state_dict.items())
    ckpt.state_dict.pop("layer4.2.conv3.weight")
    with pytest.raises(CheckpointError, match="layer4.2.conv3.weight"):
        dilated_backbone_from_checkpoint(ckpt)


def test_heads_follow_mmseg_fcn_head():
    torch.manual_seed(0)
    decode = FCNHead(2048, 512, 2, True, 21)
    assert [m[0].in_channels for m in decode.convs] == [2048, 512]
    assert decode.conv_cat[0].in_channels == 2048 + 512 and decode.conv_cat[0].out_channels == 512
    assert all(m[0].bias is None and isinstance(m[1], nn.BatchNorm2d) for m in (*decode.convs, decode.conv_cat))
    assert isinstance(decode.dropout, nn.Dropout2d) and decode.dropout.p == 0.1
    assert decode.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05)  # 10752 draws of N(0, 0.01)
    assert torch.count_nonzero(decode.conv_seg.bias) == 0
    # kaiming normal, fan-out, ReLU gain: std sqrt(2 / (512 * 9))
    assert decode.convs[1][0].weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)
    aux = FCNHead(1024, 256, 1, False, 21)
    assert len(aux.convs) == 1 and aux.conv_cat is None and aux.convs[0][0].out_channels == 256


def test_fcn_outputs_aux_only_in_training():
    torch.manual_seed(0)
    model = FCN(dilated_backbone_from_checkpoint(load_checkpoint("random")), num_classes=5)
    out = model.train()(torch.randn(2, 3, 32, 32))
    assert out["seg"].shape == out["aux"].shape == (2, 5, 4, 4)
    assert set(model.eval()(torch.randn(1, 3, 32, 32))) == {"seg"}
    logits = predict(model, torch.randn(1, 3, 32, 40), (25, 31))
    assert logits.shape == (5, 25, 31)


def test_loss_averages_over_all_pixels_including_ignored():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # 1 x 2 classes x 1 x 2
    label = torch.tensor([[[0, 255]]])
    # pixel 0: -log softmax([2, 0])[0]; pixel 1 ignored (0): mean over both pixels, not over the one labelled
    expected = math.log(1 + math.exp(-2.0)) / 2
    assert seg_loss(logits, label).item() == pytest.approx(expected)
    assert F.cross_entropy(logits, label, ignore_index=255).item() == pytest.approx(2 * expected)


def test_loss_upsamples_logits_bilinearly_to_the_label():
    torch.manual_seed(0)
    logits, label = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert seg_loss(logits, label).item() == pytest.approx(F.cross_entropy(up, label).item(), rel=1e-6)
