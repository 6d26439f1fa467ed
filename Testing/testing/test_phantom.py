"""The known-answer phantom (IWSegmentationLib.testing.phantom): the model is the function it claims,
and the case has the geometry and lesions it says."""

from __future__ import annotations

import pytest

from IWSegmentationLib.core.errors import InputError


def test_threshold_model_is_the_pointwise_function_it_claims():
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    from IWSegmentationLib.testing import phantom

    model = phantom.threshold_model(gain=20.0, level=0.5)
    x = torch.rand(1, 1, 20, 27, 33, generator=torch.Generator().manual_seed(0))  # odd sizes: padded and cropped
    with torch.no_grad():
        logits = model(x)
    # logit = 20 (x - 0.5), up to BatchNorm's eps: three BN layers scale by (1 + 1e-5)^-1/2 each
    assert logits.shape == x.shape
    assert np.abs((logits - 20.0 * (x - 0.5)).numpy()).max() < 1e-3


def test_phantom_case_geometry_and_refusals():
    np = pytest.importorskip("numpy")
    from IWSegmentationLib.testing import phantom

    case = phantom.phantom_case(spacing=(2.0, 1.0, 1.0))
    assert case.image.shape == case.reference.shape == (32, 48, 48) and case.spacing == (2.0, 1.0, 1.0)
    assert set(np.unique(case.image[case.reference > 0])) == {70.0, 85.0, 100.0}
    assert case.image.dtype == np.float32 and case.reference.dtype == np.uint8
    # maximum logits 20 (v/100 - 0.5) for v = 70, 85, 100
    assert case.confidences() == pytest.approx([4.0, 7.0, 10.0])
    with pytest.raises(InputError, match="overlaps"):
        phantom.phantom_case(lesions=[(16, 24, 24, 4.0, 100.0), (16, 26, 24, 4.0, 90.0)])
    with pytest.raises(InputError, match="0.5%"):
        phantom.phantom_case(lesions=[(16, 24, 24, 1.0, 100.0)])
    with pytest.raises(InputError, match="shape"):
        phantom.phantom_case(shape=(4, 48, 48))

