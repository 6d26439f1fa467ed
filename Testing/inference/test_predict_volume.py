"""Sliding-window inference: MONAI equality, grid/padding/cropping, skipping, cancel, OOM fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from IWSegmentationLib.core.confidence import SKIPPED_LOGIT
from IWSegmentationLib.core.errors import Cancelled, InputError
from IWSegmentationLib.inference import (
    InferenceStats,
    foreground_windows,
    importance_map,
    padding_for,
    predict_volume,
    resolve_device,
    resolve_precision,
    sliding_window_inference,
    window_starts,
)


def conv_net(in_channels: int = 1, out_channels: int = 2, seed: int = 0) -> torch.nn.Module:
    """A small random conv net: zero padding makes its output depend on the window position,
    so overlapping windows disagree and the blend is really tested."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(4, out_channels, 3, padding=1),
    ).eval()


def monai_reference(image: torch.Tensor, net, patch, overlap, blend, sigma_scale=0.125) -> torch.Tensor:
    monai = pytest.importorskip("monai.inferers")
    x = image if image.ndim == 4 else image[None]
    with torch.no_grad():
        return monai.sliding_window_inference(
            x[None], patch, 3, net, overlap=overlap, mode=blend, sigma_scale=sigma_scale
        )[0]


# --------------------------------------------------------------------------- equality with MONAI

MONAI_CASES = [
    # shape, patch, overlap, blend
    ((40, 50, 37), (16, 16, 16), 0.5, "gaussian"),
    ((40, 50, 37), (16, 20, 12), 0.25, "constant"),
    ((31, 33, 29), (16, 16, 16), 0.0, "gaussian"),
    ((14, 17, 15), (8, 9, 10), 0.75, "gaussian"),
    ((10, 50, 7), (16, 16, 16), 0.5, "gaussian"),  # patch larger than the image on two axes: padding
    ((33, 33, 33), (33, 33, 33), 0.5, "constant"),  # patch == image: one window
    ((5, 6, 7), (16, 16, 16), 0.25, "constant"),  # patch larger than the image on every axis
]


@pytest.mark.parametrize("shape,patch,overlap,blend", MONAI_CASES)
def test_matches_monai(shape, patch, overlap, blend):
    net = conv_net()
    image = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected = monai_reference(image, net, patch, overlap, blend)
    ours = sliding_window_inference(image, net, patch, overlap=overlap, blend=blend, batch_size=3)
    assert ours.shape == expected.shape == (2, *shape)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)


def test_matches_monai_numpy_multichannel_sigma_and_batch_sizes():
    net = conv_net(in_channels=2, out_channels=1)
    image = np.random.default_rng(2).normal(size=(2, 30, 26, 41)).astype(np.float32)
    expected = monai_reference(torch.from_numpy(image), net, (12, 16, 14), 0.4, "gaussian", sigma_scale=0.2)
    for batch in (1, 5):
        ours = sliding_window_inference(image, net, (12, 16, 14), overlap=0.4, sigma_scale=0.2, batch_size=batch)
        assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5, rtol=0)


@settings(max_examples=50, deadline=None)
@given(
    size=st.tuples(*[st.integers(1, 60)] * 3),
    patch=st.tuples(*[st.integers(3, 24)] * 3),
    overlap=st.floats(0.0, 0.9),
)
def test_grid_and_padding_match_monai(size, patch, overlap):
    data_utils = pytest.importorskip("monai.data.utils")
    inferer_utils = pytest.importorskip("monai.inferers.utils")
    pads = padding_for(size, patch)
    padded = tuple(s + a + b for s, (a, b) in zip(size, pads))
    assert padded == tuple(max(s, p) for s, p in zip(size, patch))
    interval = inferer_utils._get_scan_interval(padded, patch, 3, (overlap,) * 3)
    expected = sorted(tuple(s.start for s in sl) for sl in data_utils.dense_patch_slices(padded, patch, interval))
    starts = window_starts(padded, patch, (overlap,) * 3)
    ours = sorted(tuple(int(v) for v in c) for c in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, 3))
    assert ours == expected


@pytest.mark.parametrize("patch,scale", [((16, 16, 16), 0.125), ((7, 12, 33), 0.125), ((64, 64, 64), 0.25)])
def test_importance_map_matches_monai(patch, scale):
    data_utils = pytest.importorskip("monai.data.utils")
    expected = data_utils.compute_importance_map(patch, mode="gaussian", sigma_scale=scale)
    ours = importance_map(patch, "gaussian", scale)
    assert torch.equal(ours, expected)
    # peak 1 at the centre (odd side) and the 1e-3 floor at the corners (4 sigma: exp(-8) < 1e-3)
    if all(p % 2 for p in patch):
        assert ours[tuple(p // 2 for p in patch)] == 1.0
    if scale == 0.125:
        assert float(ours.min()) == pytest.approx(1e-3)
    else:  # sigma = 16: corner weight exp(-31.5**2 / 512)**3 = 0.003, above the floor
        assert float(ours.min()) == pytest.approx(np.exp(-(31.5**2) / 512) ** 3, rel=1e-5)


# --------------------------------------------------------------------------- invariants without MONAI


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 30)] * 3),
    patch=st.tuples(*[st.integers(4, 16)] * 3),
    overlap=st.sampled_from([0.0, 0.25, 0.5, 0.8]),
    blend=st.sampled_from(["gaussian", "constant"]),
)
def test_pointwise_predictor_is_reproduced_exactly(shape, patch, overlap, blend):
    """A voxel-wise predictor gives the same value in every window, so any weighted average of
    them is that value: out == f(image) for every shape (odd, smaller than the patch, ...)."""
    image = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    out = sliding_window_inference(image, lambda x: 3 * x - 1, patch, overlap=overlap, blend=blend, batch_size=2)
    assert out.shape == (1, *shape)
    np.testing.assert_allclose(out[0], 3 * image - 1, atol=1e-5, rtol=1e-5)


def test_window_starts_hand_computed():
    # side 10, patch 4, overlap 0.5: interval int(4 * 0.5) = 2, starts 0 2 4 6 (6 + 4 reaches 10)
    # side 9, patch 4, overlap 0.25: interval int(3.0) = 3, starts 0 3 then 6 -> shifted back to 5
    # side 4 == patch: one window
    assert window_starts((10, 9, 4), (4, 4, 4), (0.5, 0.25, 0.5)) == [[0, 2, 4, 6], [0, 3, 5], [0]]
    assert padding_for((3, 10, 4), (6, 4, 7)) == [(1, 2), (0, 0), (1, 2)]


def test_foreground_windows_hand_computed():
    # side 8, patch 4, overlap 0.5: starts 0 2 4 on each axis; one foreground voxel at (1, 5, 7)
    # z: windows [0,4) contain 1 -> z-starts 0 only; y: [2,6) and [4,8) contain 5; x: [4,8) contains 7
    fg = np.zeros((8, 8, 8), bool)
    fg[1, 5, 7] = True
    starts = window_starts((8, 8, 8), (4, 4, 4), (0.5,) * 3)
    hit = foreground_windows(fg, starts, (4, 4, 4))
    expected = np.zeros((3, 3, 3), bool)
    expected[0, 1:, 2] = True
    assert np.array_equal(hit, expected)
    assert not foreground_windows(np.zeros((8, 8, 8), bool), starts, (4, 4, 4)).any()


def test_skipping_keeps_foreground_values_and_zeroes_uncovered():
    net = conv_net(out_channels=1)
    shape = (24, 48, 48)
    image = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    fg = np.zeros(shape, bool)
    fg[4:12, 5:15, 30:40] = True
    full_stats, skip_stats = InferenceStats(), InferenceStats()
    full = sliding_window_inference(image, net, 16, overlap=0.5, stats=full_stats)
    skipped = sliding_window_inference(image, net, 16, overlap=0.5, foreground=fg, stats=skip_stats)
    assert skip_stats.windows_run < full_stats.windows_run == full_stats.windows_total == 2 * 5 * 5
    # every window holding a foreground voxel ran, so those voxels blend the same windows
    np.testing.assert_allclose(skipped[0][fg], full[0][fg], atol=1e-6, rtol=0)
    # voxels no window covers: fill value 0 (here: far corner, outside every run window)
    assert np.all(skipped[0, :, 40:, :] == 0) and np.all(skipped[0, :, :, :8] == 0)
    assert not np.allclose(full[0, :, 40:, :], 0)


def test_empty_foreground_runs_nothing():
    calls = []

    def predictor(x):
        calls.append(x.shape[0])
        return x

    out = sliding_window_inference(np.ones((10, 10, 10), np.float32), predictor, 4,
                                   foreground=np.zeros((10, 10, 10), bool), fill_value=0.0)
    assert out.shape == (1, 10, 10, 10) and not out.any()
    assert calls == [1]  # only the probe that finds the output channel count


def test_small_slabs_give_the_same_result(monkeypatch):
    import IWSegmentationLib.inference.sliding_window as sliding_window

    net = conv_net(out_channels=1)
    image = torch.randn(25, 16, 17, generator=torch.Generator().manual_seed(4))
    big = sliding_window_inference(image, net, (9, 8, 8), overlap=0.5)
    monkeypatch.setattr(sliding_window, "_SLAB_VOXELS", 16 * 17 * 3)  # 3-slice slabs, not aligned with windows
    small = sliding_window_inference(image, net, (9, 8, 8), overlap=0.5)
    assert torch.equal(big, small)


def test_progress_and_cancel():
    net = conv_net(out_channels=1)
    image = torch.randn(16, 16, 16)
    seen = []
    sliding_window_inference(image, net, 8, overlap=0.5, batch_size=4, progress=lambda d, t: seen.append((d, t)))
    # 3 x 3 x 3 = 27 windows in batches of 4: 4, 8, ..., 24, 27
    assert seen == [(d, 27) for d in (4, 8, 12, 16, 20, 24, 27)]
    checks = []

    def cancel():
        checks.append(1)
        return len(checks) > 2

    with pytest.raises(Cancelled, match="after 8 of 27"):
        sliding_window_inference(image, net, 8, overlap=0.5, batch_size=4, cancel=cancel)


def test_out_of_memory_halves_the_batch_then_falls_back_to_cpu():
    net = conv_net(out_channels=1)
    image = torch.randn(20, 24, 28, generator=torch.Generator().manual_seed(5))
    reference = sliding_window_inference(image, net, 8)

    class BatchLimited(torch.nn.Module):
        def __init__(self, limit):
            super().__init__()
            self.net, self.limit = net, limit

        def forward(self, x):
            if x.shape[0] > self.limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.net(x)

    messages, stats = [], InferenceStats()
    out = sliding_window_inference(image, BatchLimited(1), 8, batch_size=4, on_warning=messages.append, stats=stats)
    assert stats.batch_size == 1 and len(messages) == 2 and "batch size 2" in messages[0]
    assert torch.allclose(out, reference, atol=1e-6)

    class AcceleratorOOM(BatchLimited):
        def forward(self, x):
            if x.device.type != "cpu":
                raise torch.OutOfMemoryError("out of memory")
            return self.net(x)

    # the "meta" device stands in for a GPU that has no memory: every call there fails
    messages, stats = [], InferenceStats()
    out = sliding_window_inference(image, AcceleratorOOM(0), 8, batch_size=2, device="meta",
                                   on_warning=messages.append, stats=stats)
    assert stats.device == "cpu" and "continuing on the CPU" in messages[-1]
    assert torch.allclose(out, reference, atol=1e-6)


def test_precision_and_device_resolution():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(InputError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device auto"):
            resolve_device("cuda")
    net = conv_net(out_channels=1)
    image = torch.randn(12, 12, 12)
    fp32 = sliding_window_inference(image, net, 8)
    bf16 = sliding_window_inference(image, net, 8, precision="bf16")
    assert (bf16 - fp32).abs().max() < 0.05  # bf16 has 8 mantissa bits: close, not equal


@pytest.mark.parametrize("kwargs,match", [
    ({"overlap": 1.0}, "overlap"),
    ({"overlap": -0.1}, "overlap"),
    ({"blend": "median"}, "blend"),
    ({"batch_size": 0}, "batch_size"),
    ({"foreground": np.ones((3, 3, 3), bool)}, "foreground"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        sliding_window_inference(np.zeros((8, 8, 8), np.float32), lambda x: x, 4, **kwargs)
    with pytest.raises(InputError, match="shape"):
        sliding_window_inference(np.zeros((8, 8), np.float32), lambda x: x, 4)
    with pytest.raises(InputError, match="patch_size"):
        sliding_window_inference(np.zeros((8, 8, 8), np.float32), lambda x: x, (4, 4))


def test_predict_volume_resamples_back_and_skips():
    """predict_volume with a target spacing works on the coarse grid and returns the input grid;
    the body threshold (-900 HU for ct-lung) skips the air windows, which get probability 0."""
    from IWSegmentationLib.core.imageio import Geometry
    from IWSegmentationLib.nn.unet import build_model, default_config
    from IWSegmentationLib.preprocessing.presets import get_preset

    torch.manual_seed(0)
    model = build_model(default_config("tiny"))
    image = np.full((30, 64, 64), -1000, np.int16)
    image[4:26, 8:20, 8:20] = 20  # on the 2x-coarser grid (15, 32, 32): y, x 4..10, window starts 0 12 16
    geometry = Geometry(size=(64, 64, 30), spacing=(0.5, 0.5, 1.0), origin=(0.0, 0.0, 0.0))
    meta = {"patch_size": [16, 16, 16], "threshold": 0.5,
            "preprocessing": get_preset("ct-lung", target_spacing=[2.0, 1.0, 1.0])}
    with pytest.warns(RuntimeWarning, match="no lung field found"):  # a body without lungs
        result = predict_volume(model, image, meta, geometry=geometry, device="cpu")
    assert result.probabilities.shape == result.mask.shape == image.shape
    assert result.probabilities.dtype == np.float32 and result.mask.dtype == np.uint8
    # 1 z-window (15 < 16: padded) x 3 x 3; only the one at y = x = 0 holds body voxels
    assert (result.stats.windows_run, result.stats.windows_total) == (1, 9)
    assert np.all(result.probabilities[:, 40:, :] == 0) and np.all(result.probabilities[:, :, 40:] == 0)
    assert np.all((result.probabilities > 0)[4:26, 8:20, 8:20])
    assert np.array_equal(result.mask, (result.probabilities > 0.5).astype(np.uint8))
    # the skipped windows hold SKIPPED_LOGIT (-1e4), far below every threshold, and sigmoid(-1e4) is exactly 0
    assert result.logits.dtype == np.float32 and np.all(result.logits[:, 40:, :] == SKIPPED_LOGIT)
    assert np.array_equal(result.mask, (result.logits > 0).astype(np.uint8))


class ConstantLogit(torch.nn.Module):
    """A network whose every logit is ``value``."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x[:, :1], self.value)


def test_resampling_back_never_makes_lesions_from_the_fill_value():
    """A 5-slice scan (1 mm) worked on at 4 mm along z: the coarse grid has floor(5 / 4 + 0.5) = 1
    slice, centred at z = 1.5 mm, which ITK extends by half a voxel to [-0.5, 3.5] mm, so slice
    4 (z = 4 mm) of the input grid lies outside it and gets the resampler's fill value. Every
    logit is -1 (probability 0.27). At threshold 0.2 (logit -1.386) every covered voxel is
    lesion; the uncovered slice must read as skipped (probability 0, no lesion), not as logit
    0, which is probability 0.5 and would be lesion at this threshold."""
    from IWSegmentationLib.core.imageio import Geometry
    from IWSegmentationLib.preprocessing.presets import get_preset

    image = np.random.default_rng(0).normal(100, 10, (5, 16, 16)).astype(np.float32)
    geometry = Geometry(size=(16, 16, 5), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    meta = {"patch_size": [4, 16, 16], "threshold": 0.2,
            "preprocessing": get_preset("mr", target_spacing=[4.0, None, None])}
    result = predict_volume(ConstantLogit(-1.0), image, meta, geometry=geometry, device="cpu", engine="eager",
                            skip_background=False)
    assert result.mask.shape == image.shape
    np.testing.assert_allclose(result.logits[:4], -1.0, atol=1e-6)
    assert result.mask[:4].all()
    assert result.logits[4].max() < -1000 and not result.mask[4].any() and result.probabilities[4].max() == 0


# --------------------------------------------------------------------------- the frozen CPU engine


def unet_with_running_stats(size: str = "tiny", seed: int = 0) -> torch.nn.Module:
    """A U-Net in eval mode whose BatchNorms have non-trivial running statistics, so that folding
    them into the convolutions (what the frozen engine does) changes the arithmetic for real."""
    from IWSegmentationLib.nn.unet import build_model, default_config

    torch.manual_seed(seed)
    model = build_model(default_config(size)).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 16), (3, 1, 24, 16, 32), (2, 1, 13, 20, 9)])
def test_frozen_network_equals_eager(shape):
    """Traced once on a 16x24x16 probe, the frozen network serves other batch sizes and sides,
    including sides that are not multiples of the stride (13, 9: padded and cropped back)."""
    from IWSegmentationLib.inference import FrozenNetwork, freeze_for_cpu

    model = unet_with_running_stats()
    network = freeze_for_cpu(model)
    assert isinstance(network, FrozenNetwork)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = model(x), network(x)
    assert got.shape == expected.shape == (shape[0], 1, *shape[2:])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_frozen_engine_refuses_what_it_cannot_check():
    """No stride/config (a plain conv net): None, silently. A check that cannot pass (negative
    tolerance): None, with a warning that says the engine falls back to eager."""
    from IWSegmentationLib.inference import freeze_for_cpu

    assert freeze_for_cpu(conv_net()) is None
    said = []
    assert freeze_for_cpu(unet_with_running_stats(), tolerance=-1.0, on_warning=said.append) is None
    assert len(said) == 1 and "running it eagerly" in said[0]


def test_engine_resolution():
    from IWSegmentationLib.inference import resolve_engine

    cpu = torch.device("cpu")
    assert resolve_engine("auto", cpu, "fp32") == "frozen"
    # the paper U-Net (0.40 MFLOP/voxel) is compute-bound: eager + channels_last is faster there
    assert resolve_engine("auto", cpu, "fp32", flops_per_voxel=0.399e6) == "eager"
    assert resolve_engine("auto", cpu, "fp32", flops_per_voxel=0.05e6) == "frozen"
    assert resolve_engine("auto", cpu, "bf16") == "eager"  # autocast needs the eager module
    assert resolve_engine("auto", torch.device("cuda"), "fp16") == "eager"
    assert resolve_engine("eager", cpu, "fp32") == "eager"
    with pytest.raises(InputError, match="engine 'frozen' runs fp32 on the CPU only"):
        resolve_engine("frozen", cpu, "bf16")
    with pytest.raises(InputError, match="engine must be one of"):
        resolve_engine("jit", cpu, "fp32")


def test_predict_volume_frozen_and_eager_agree():
    """The default (frozen) and the eager engine give the same probabilities on a whole volume."""
    from IWSegmentationLib.preprocessing.presets import get_preset

    model = unet_with_running_stats()
    image = np.random.default_rng(0).normal(0, 300, (20, 40, 36)).astype(np.float32)
    meta = {"patch_size": [16, 24, 16], "threshold": 0.5, "preprocessing": get_preset("ct-liver")}
    frozen = predict_volume(model, image, meta, device="cpu", skip_background=False)
    eager = predict_volume(model, image, meta, device="cpu", skip_background=False, engine="eager")
    assert (frozen.stats.engine, eager.stats.engine) == ("frozen", "eager")
    assert frozen.stats.windows_run == eager.stats.windows_run == frozen.stats.windows_total
    np.testing.assert_allclose(frozen.probabilities, eager.probabilities, atol=1e-6)


def test_more_windows_than_a_job_may_run_is_refused_before_any_runs():
    """#23 item 5: windows per volume are bounded. Hand-worked: a 100 x 200 x 200 volume in 8^3
    windows at overlap 0.5 (step 4) has (100 - 8) / 4 + 1 = 24 by (200 - 8) / 4 + 1 = 49 by 49
    starts: 57,624 windows, under MAX_WINDOWS; at overlap 0.75 (step 2): 47 x 97 x 97 = 442,223,
    refused naming the count, patch, overlap and volume, with the predictor never called."""
    from IWSegmentationLib.inference.sliding_window import MAX_WINDOWS, sliding_window_inference

    calls = []

    def predictor(batch):
        calls.append(batch.shape)
        return torch.zeros((batch.shape[0], 1, *batch.shape[2:]))

    image = np.zeros((100, 200, 200), np.float32)
    assert 57_624 < MAX_WINDOWS < 442_223
    with pytest.raises(InputError, match=r"442,223 windows of \[8, 8, 8\] voxels at overlap \[0.75, 0.75, 0.75\] over "
                                         r"a volume of \[100, 200, 200\] voxels: more than the 200,000"):
        sliding_window_inference(image, predictor, 8, overlap=0.75)
    assert calls == []
