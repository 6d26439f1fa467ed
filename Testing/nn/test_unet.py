"""The paper's residual 3D U-Net: size, cost, shapes, padding, gradients, memory layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.nn.unet import (
    PAPER_CONFIG,
    TINY_CONFIG,
    build_model,
    count_parameters,
    default_config,
    flops_per_voxel,
    macs_per_voxel,
    model_stride,
    pad_to_multiple,
)


def _rb(i: int, o: int, k3: int = 27) -> int:
    """Parameters of a residual block i->o: BN(i) 2i, conv i*o*k3, BN(o) 2o, conv o*o*k3, and a
    bias-free 1x1x1 shortcut conv i*o when i != o."""
    return 2 * i + i * o * k3 + 2 * o + o * o * k3 + (0 if i == o else i * o)


def _pa(i: int, o: int, k3: int = 27) -> int:
    """Parameters of a pre-activation unit with conv bias: BN(i) 2i, conv i*o*k3, bias o."""
    return 2 * i + i * o * k3 + o


def test_paper_parameter_count_matches_hand_count():
    # Hand count of the paper's net (channels 16/64/128/256, two blocks per level):
    #   stem          conv 1->16 (432, no bias) + preact 16->16 k3 (6,960)          =     7,392
    #   level 0       enc 2x rb(16,16) 27,776 + skip pa(16,16,1) 304 + dec 27,776  =    55,856
    #   level 1       rb(16,64) 139,424 + rb(64,64) 221,440 + skip 4,288
    #                 + rb(64,64) 221,440 + rb(64,16) 35,744                      =   622,336
    #   level 2       rb(64,128) 672,128 + rb(128,128) 885,248 + skip 16,768
    #                 + rb(128,128) 885,248 + rb(128,64) 340,352                  = 2,799,744
    #   bottleneck    rb(128,256) 2,687,744 + rb(256,256) 3,539,968 + rb(256,128) 1,360,640
    #                                                                              = 7,588,352
    #   head          rb(16,16,1x1) 576 + pa(16,1,1x1) 49                         =       625
    #   total                                                                      = 11,074,305
    # The authors report 11.07 M.
    hand = (
        16 * 27 + _pa(16, 16)
        + 4 * _rb(16, 16) + _pa(16, 16, 1)
        + _rb(16, 64) + 2 * _rb(64, 64) + _pa(64, 64, 1) + _rb(64, 16)
        + _rb(64, 128) + 2 * _rb(128, 128) + _pa(128, 128, 1) + _rb(128, 64)
        + _rb(128, 256) + _rb(256, 256) + _rb(256, 128)
        + _rb(16, 16, 1) + _pa(16, 1, 1)
    )
    assert hand == 11_074_305
    assert count_parameters(build_model(PAPER_CONFIG)) == hand


def test_paper_flops_per_voxel_matches_hand_count():
    # Conv MACs per input voxel, level l counted at 1/8**l of the input voxels:
    #   level 0: 432 + 6,912 + 4*6,912 + 256 + 4*6,912 + 256 + 256 + 16        = 63,424
    #   level 1: (139,264 + 221,184 + 4,096 + 221,184 + 35,584) / 8            = 77,664
    #   level 2: (671,744 + 884,736 + 16,384 + 884,736 + 339,968) / 64         = 43,712
    #   level 3: (2,686,976 + 3,538,944 + 1,359,872) / 512                     = 14,816
    #   total 199,616 MAC = 399,232 FLOP per voxel (method notes: ~0.40 MFLOP, 837 GFLOP/128^3)
    assert macs_per_voxel(PAPER_CONFIG) == pytest.approx(199_616)
    assert flops_per_voxel(PAPER_CONFIG) == pytest.approx(399_232)
    assert flops_per_voxel(PAPER_CONFIG) * 128**3 / 1e9 == pytest.approx(837.3, abs=0.1)


def test_paper_net_runs_and_stride():
    model = build_model(PAPER_CONFIG).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 1, 8, 12, 8))
    assert out.shape == (1, 1, 8, 12, 8)
    assert model_stride(PAPER_CONFIG) == 8
    assert model_stride(default_config(channels=[4, 8, 16])) == 4


@settings(max_examples=8, deadline=None)
@given(d=st.integers(1, 19), h=st.integers(1, 19), w=st.integers(1, 19))
def test_output_shape_equals_input_shape_for_any_size(d, h, w):
    torch.manual_seed(0)
    model = build_model(TINY_CONFIG).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 1, d, h, w))
    assert out.shape == (2, 1, d, h, w)
    assert torch.isfinite(out).all()


def test_odd_input_equals_min_padded_input_cropped():
    torch.manual_seed(1)
    model = build_model(TINY_CONFIG).eval()
    x = torch.randn(2, 1, 9, 13, 7)
    # explicit padding to 16x16x8 with each sample's minimum, at the far end of each axis
    padded = x.amin(dim=(1, 2, 3, 4), keepdim=True).expand(2, 1, 16, 16, 8).clone()
    padded[:, :, :9, :13, :7] = x
    with torch.inference_mode():
        odd = model(x)
        full = model(padded)
    torch.testing.assert_close(odd, full[:, :, :9, :13, :7], rtol=0, atol=1e-6)
    assert pad_to_multiple(padded, 8) is padded  # already aligned: no copy


def test_forward_backward_and_training_reduces_loss():
    torch.manual_seed(2)
    model = build_model(TINY_CONFIG).train()
    x = torch.randn(2, 1, 16, 16, 16)
    target = (x > 0.5).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 1:
            grads = [p.grad for p in model.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(int(g.abs().sum() > 0) for g in grads) == len(grads)  # every parameter learns
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses


def test_channels_last_3d_gives_same_output():
    torch.manual_seed(3)
    model = build_model(TINY_CONFIG).eval()
    x = torch.randn(1, 1, 16, 24, 15)
    with torch.inference_mode():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last_3d)
        out = model_cl(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_config_validation():
    with pytest.raises(InputError, match=r"unknown model config key.*'chanels'.*valid keys: name, in_channels"):
        build_model({**PAPER_CONFIG, "chanels": [1, 2]})
    with pytest.raises(InputError, match="channels"):
        default_config(channels=[16])
    with pytest.raises(InputError, match="blocks_per_level"):
        default_config(blocks_per_level=0)
    with pytest.raises(InputError, match="kernel_size"):
        default_config(kernel_size=2)
    with pytest.raises(InputError, match="unknown model size"):
        default_config("huge")
    assert default_config("tiny") == TINY_CONFIG
    assert build_model(default_config("tiny")).config["channels"] == [4, 8, 16, 32]


def test_bad_input_shape_is_a_clear_error():
    model = build_model(TINY_CONFIG)
    with pytest.raises(InputError, match=r"\(B, C, D, H, W\)"):
        model(torch.zeros(1, 8, 8, 8))
    with pytest.raises(InputError, match="input channel"):
        model(torch.zeros(1, 2, 8, 8, 8))


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_batch_independent_norms(norm):
    """InstanceNorm and GroupNorm have the same 2·C affine parameters per unit as BatchNorm (so
    the parameter count is unchanged), and their output for one sample does not depend on the
    other samples of the batch — in training mode too, where BatchNorm's does."""
    torch.manual_seed(0)
    config = default_config("tiny", norm=norm)
    assert count_parameters(build_model(config)) == count_parameters(build_model(default_config("tiny")))
    x = torch.randn(2, 1, 16, 16, 16)
    for kind, expect_equal in ((norm, True), ("batch", False)):
        model = build_model(default_config("tiny", norm=kind)).train()
        with torch.no_grad():
            alone, together = model(x[:1]), model(x)[:1]
        assert torch.allclose(alone, together, atol=1e-5) is expect_equal, kind


def test_unknown_norm_is_refused():
    with pytest.raises(InputError, match="'norm' must be one of batch, instance, group"):
        default_config("tiny", norm="layer")


def test_frozen_engine_with_instance_norm():
    from IWSegmentationLib.inference import freeze_for_cpu

    torch.manual_seed(0)
    model = build_model(default_config("tiny", norm="instance")).eval()
    network = freeze_for_cpu(model)
    x = torch.randn(2, 1, 24, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(network(x), model(x), atol=1e-5)


# --------------------------------------------------------------------------- the authors' head (issue 20)


def test_head_norm_builds_the_authors_head_and_default_cards_keep_ours():
    """``head_norm: true`` ends the head with a bias-free 1x1x1 conv and BatchNorm3d(out_channels),
    as the authors' network. Hand count against the default head: pa(16, 1, 1) with bias is
    2·16 (BN) + 16 (conv) + 1 (bias) = 49; the authors' is 2·16 + 16 + 2 (BN(1): weight, bias) = 50,
    so the paper net has one more parameter, 11,074,306."""
    authors = build_model(default_config("paper", head_norm=True))
    assert count_parameters(authors) == 11_074_305 + 1
    head_conv, last = authors.head[1][2], authors.head[-1]
    assert head_conv.bias is None and isinstance(last, torch.nn.BatchNorm3d) and last.num_features == 1
    # a config (a model card) written before the key existed builds today's head: conv with bias
    old = {k: v for k, v in TINY_CONFIG.items() if k != "head_norm"}
    model = build_model(old)
    assert model.config["head_norm"] is False
    assert len(model.head) == 2 and model.head[1][2].bias is not None
    with pytest.raises(InputError, match="'head_norm' must be true or false"):
        default_config("tiny", head_norm="yes")
