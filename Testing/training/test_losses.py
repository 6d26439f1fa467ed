"""The loss family: hand-computed values, iw-variants, gradients, autocast, bad arguments.

Hand case (docs/losses.md, method notes): shape (1, 1, 2, 2, 2),
  logits x = [2, -1, 0.5, -3, 1, 0, -2, 3], target t = [1, 0, 1, 0, 0, 0, 0, 1],
  weights w = [5, 1, 5, 1, 1, 1, 1, 2].
  p = σ(x) = [.880797, .268941, .622459, .047426, .731059, .5, .119203, .952574]
  log p     = [-.126928, -1.313262, -.474077, -3.048587, -.313262, -.693147, -2.126928, -.048587]
  log(1-p)  = [-2.126928, -.313262, -.974077, -.048587, -1.313262, -.693147, -.126928, -3.048587]
  BCE_i     = [.126928, .313262, .474077, .048587, 1.313262, .693147, .126928, .048587]
  Σp = 4.122459, Σpt = .880797 + .622459 + .952574 = 2.455830, Σp² = 2.943891, Σt = 3
  weighted: Σwpt = 5·.880797 + 5·.622459 + 2·.952574 = 9.421430
"""

import math

import pytest
import torch

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.weights import inverse_weights
from IWSegmentationLib.nn.losses import LOSS_NAMES, get_loss, loss_parameters

SHAPE = (1, 1, 2, 2, 2)
X = torch.tensor([2, -1, 0.5, -3, 1, 0, -2, 3.0]).view(SHAPE)
T = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1.0]).view(SHAPE)
W = torch.tensor([5, 1, 5, 1, 1, 1, 1, 2.0]).view(SHAPE)
PLAIN = ("bce", "focal", "dice", "asl", "combo")

# (name, params, unweighted value, weighted value)
HAND_CASES = [
    # BCE: mean(BCE_i) = 3.144779 / 8 ; weighted mean(w·BCE_i) = 5.597385 / 8   (method notes)
    ("bce", {}, 0.393097, 0.699673),
    # Focal α=.75 γ=2: t=1 terms .75(1-p)²(-log p), t=0 terms .25 p²(-log(1-p)); mean of 8
    ("focal", {}, 0.0346308, 0.0606574),
    # Dice: 1 - 2·2.455830 / (2.943891 + 3) = 0.173662
    #       weighted: 1 - 2·9.421430 / Σw(p²+t²) = 1 - 18.842861 / 20.510174 = 0.081030
    ("dice", {}, 0.173662, 0.081030),
    # WCE: w+ = (8 - 4.122459) / 4.122459 = 0.940589 ;
    #   mean(-(w+ t log p + (1-t) log(1-p))) = (.940589·.649592 + 2.495270) / 8 = 0.388273
    #   weighted: (.940589·(5·.126928 + 5·.474077 + 2·.048587) + 2.495270) / 8 = 0.676635
    ("wce", {}, 0.388273, 0.676635),
    # ASL β=1.5 (Table 1): 1 - 3.25·Σpt / Σ(2.25 t + p) = 1 - 3.25·2.455830 / (6.75 + 4.122459)
    #   = 1 - 7.981449 / 10.872459 = 0.265902 ; weighted 1 - 3.25·9.421430 / 38.088059 = 0.196083
    ("asl", {}, 0.265902, 0.196083),
    # ASL, the code's squared form: 1 - 7.981449 / (6.75 + 2.943891) = 0.176652 ;
    #   weighted 1 - 3.25·9.421430 / 35.504325 = 0.137580
    ("asl", {"squared": True}, 0.176652, 0.137580),
    # GDL: W_fg = 1/(1+3²) = 0.1, W_bg = 1/(1+5²) = 1/26;
    #   num = .1·2.455830 + (1/26)·Σ(1-p)(1-t) [= 3.333365] = 0.373790
    #   den = .1·(2.943891 + 3) + (1/26)·Σ((1-p)² + (1-t)²) [= 7.696347] = 0.890503
    #   1 - 2·.373790 / .890503 = 0.160498 ; weighted: 1 - 2·1.070350 / 2.370748 = 0.097036
    ("gdl", {}, 0.160498, 0.097036),
    # DBCE radius 0 = balanced CE: |D| = 3 -> 8/6 on lesions, 8/10 elsewhere;
    #   (4/3·.649592 + .8·2.495270) / 8 = 0.357784 ; weighted 0.766552
    ("dbce", {"radius": 0}, 0.357784, 0.766552),
    # DBCE radius 3 covers the whole 2³ patch: weights 1, so plain BCE
    ("dbce", {}, 0.393097, 0.699673),
    # Combo α=β=.5, S=1: CE = mean(-(.5 t log p + .5 (1-t) log(1-p))) = 0.196549;
    #   DSC = (2·2.455830 + 1)/(Σ(p+t) + 1) = 5.911661 / 8.122459 = 0.727817
    #   .5·.196549 - .5·.727817 = -0.265634 ; weighted: .5·.349837 - .5·.823763 = -0.236963
    ("combo", {}, -0.265634, -0.236963),
]


def _value(name, x=X, t=T, w=None, **params):
    return float(get_loss(name, **params)(x, t, w))


@pytest.mark.parametrize("name, params, plain, weighted", HAND_CASES)
def test_hand_computed_values(name, params, plain, weighted):
    assert _value(name, **params) == pytest.approx(plain, abs=2e-6)
    assert _value(name, w=W, **params) == pytest.approx(weighted, abs=2e-6)


@pytest.mark.parametrize("name", PLAIN)
def test_iw_variant_uses_given_weight_and_equals_plain_with_unit_weights(name):
    iw = get_loss(f"iw-{name}")
    ones = torch.ones(SHAPE)
    assert float(iw(X, T, ones)) == pytest.approx(_value(name), abs=1e-7)
    assert float(iw(X, T, W)) == pytest.approx(_value(name, w=W), abs=1e-7)
    # computed inverse weights that are all 1 (clip at w_max = 1) also give the plain loss
    assert float(get_loss(f"iw-{name}", w_max=1.0)(X, T)) == pytest.approx(_value(name), abs=1e-7)


@pytest.mark.parametrize("name", PLAIN)
def test_iw_variant_computes_inverse_weights_from_the_target(name):
    g = torch.Generator().manual_seed(0)
    t = torch.zeros(2, 1, 8, 8, 8)
    t[0, 0, 1, 1, 1] = 1
    t[0, 0, 4:7, 4:7, 4:7] = 1  # 1-voxel and 27-voxel lesions: iw weights 512/3 and 512/81
    t[1, 0, 2:4, 2:4, 2:4] = 1
    x = torch.randn(t.shape, generator=g)
    for mode in ("clip", "exact"):
        expected = _value(name, x=x, t=t, w=inverse_weights(t, mode=mode))
        assert float(get_loss(f"iw-{name}", mode=mode)(x, t)) == pytest.approx(expected, rel=1e-6)
    # and the weights matter: the iw loss differs from the plain one here
    assert float(get_loss(f"iw-{name}")(x, t)) != pytest.approx(_value(name, x=x, t=t), rel=1e-3)


def test_documented_special_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, 4, generator=g) * 3
    t = (torch.rand(2, 1, 4, 4, 4, generator=g) > 0.7).float()
    # ASL with β = 1 and the squared denominator is the Dice loss
    assert _value("asl", x, t, beta=1.0, squared=True) == pytest.approx(_value("dice", x, t), rel=1e-6)
    # Focal with γ = 0, α = 0.5 is half the BCE
    assert _value("focal", x, t, alpha=0.5, gamma=0.0) == pytest.approx(0.5 * _value("bce", x, t), rel=1e-6)
    # Combo with α = 1 is the β-weighted CE; β = 0.5 makes it half the BCE
    assert _value("combo", x, t, alpha=1.0) == pytest.approx(0.5 * _value("bce", x, t), rel=1e-6)
    # region losses: per-sample value, mean over the batch
    for name in ("dice", "asl", "gdl"):
        per_sample = [_value(name, x[i:i + 1], t[i:i + 1]) for i in range(2)]
        assert _value(name, x, t) == pytest.approx(sum(per_sample) / 2, rel=1e-6)


def test_all_names_exist_and_have_documented_formulas():
    assert set(LOSS_NAMES) == {"bce", "focal", "wce", "dice", "asl", "gdl", "dbce", "combo",
                               "iw-bce", "iw-focal", "iw-dice", "iw-asl", "iw-combo"}
    for name in LOSS_NAMES:
        loss = get_loss(name)
        assert isinstance(loss, torch.nn.Module)
        doc = type(loss).__doc__ or ""
        assert "Table 1" in doc or "arXiv" in doc or "et al" in doc, name  # names its source
    assert get_loss("IW_Dice").name == "iw-dice"
    assert loss_parameters("focal") == {"alpha": 0.75, "gamma": 2.0}


# --------------------------------------------------------------------------- numerics


def _targets():
    t = torch.zeros(2, 1, 6, 6, 6)
    t[0, 0, 1:3, 1:3, 1:3] = 1
    t[1, 0, 4, 4, 4] = 1
    return {"mixed": t, "all-background": torch.zeros(2, 1, 6, 6, 6), "all-foreground": torch.ones(2, 1, 6, 6, 6)}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_finite_loss_and_gradients_on_extreme_patches(name):
    loss = get_loss(name)
    g = torch.Generator().manual_seed(2)
    for kind, t in _targets().items():
        for scale in (1.0, 30.0, 1e4):  # ordinary, saturated and absurd logits
            x = (torch.randn(t.shape, generator=g) * scale).requires_grad_()
            value = loss(x, t)
            value.backward()
            assert value.ndim == 0 and torch.isfinite(value), (name, kind, scale)
            assert torch.isfinite(x.grad).all(), (name, kind, scale)
        for logit in (-100.0, 100.0):  # σ(-100)² underflows to 0: Σw(p² + t²) = 0 on empty patches
            x = torch.full(t.shape, logit, requires_grad=True)
            value = loss(x, t)
            value.backward()
            assert torch.isfinite(value) and torch.isfinite(x.grad).all(), (name, kind, logit)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_autocast_on_cpu(name):
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(1, 1, 3, padding=1)
    image = torch.randn(2, 1, 8, 8, 8)
    t = (image > 1.0).float()
    loss = get_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, t)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    # computed in float32 from the bf16 logits, exactly as outside autocast
    assert float(value.detach()) == pytest.approx(float(loss(logits.detach().float(), t)), rel=1e-6, abs=1e-7)
    # half-precision logits without autocast are accepted too
    assert torch.isfinite(loss(logits.detach().half(), t))


def test_a_few_training_steps_reduce_the_loss():
    """A tiny conv net fitting two lesions of very different size with iw-Dice."""
    torch.manual_seed(4)
    image = torch.zeros(1, 1, 12, 12, 12)
    image[0, 0, 2:8, 2:8, 2:8] = 1.0  # large lesion
    image[0, 0, 10, 10, 10] = 1.0  # 1-voxel lesion
    target = image.clone()
    image = image + 0.1 * torch.randn(image.shape)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 1))
    loss = get_loss("iw-dice")
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    values = []
    for _ in range(20):
        opt.zero_grad()
        value = loss(net(image), target)
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    assert values[-1] < 0.5 * values[0]


# --------------------------------------------------------------------------- bad arguments


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(InputError, match="unknown loss 'tversky'") as err:
        get_loss("tversky")
    assert all(n in str(err.value) for n in LOSS_NAMES)
    with pytest.raises(InputError, match="valid names"):
        get_loss(None)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("focal", {"alpha": 1.5}, "alpha"),
        ("focal", {"gamma": -1}, "gamma"),
        ("focal", {"gamma": float("nan")}, "gamma"),
        ("asl", {"beta": 0}, "beta"),
        ("combo", {"beta": "high"}, "beta"),
        ("gdl", {"smooth": 0}, "smooth"),
        ("dbce", {"radius": -2}, "radius"),
        ("wce", {"min_sum": 0}, "min_sum"),
        ("iw-dice", {"mode": "soft"}, "mode"),
        ("iw-bce", {"connectivity": 8}, "connectivity"),
        ("iw-asl", {"w_min": 5.0, "w_max": 1.0}, "w_max"),
        ("dice", {"smooth": 1.0}, "unknown parameter"),
        ("bce", {"weight": 2.0}, "unknown parameter"),
    ],
)
def test_bad_parameters(name, params, message):
    with pytest.raises(InputError, match=message):
        get_loss(name, **params)


@pytest.mark.parametrize(
    "logits, target, weight, message",
    [
        (torch.zeros(2, 8, 8, 8), torch.zeros(2, 8, 8, 8), None, r"\(B, 1, D, H, W\)"),
        (torch.zeros(2, 2, 4, 4, 4), torch.zeros(2, 2, 4, 4, 4), None, r"\(B, 1, D, H, W\)"),
        (torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5), None, "target shape"),
        (torch.zeros(1, 1, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 255.0), None, "binary"),
        (torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), -torch.ones(1, 1, 4, 4, 4), ">= 0"),
        (torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 4, 4), "weight shape"),
        (torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), torch.zeros(1, 1, 4, 4, 4), None, "floating"),
    ],
)
def test_bad_inputs(logits, target, weight, message):
    for name in ("bce", "iw-dice"):
        with pytest.raises(InputError, match=message):
            get_loss(name)(logits, target, weight)


def test_nan_weight_or_target_is_rejected():
    with pytest.raises(InputError, match="finite"):
        get_loss("dice")(X, T, torch.full(SHAPE, math.nan))
    with pytest.raises(InputError, match="binary"):
        get_loss("bce")(X, torch.full(SHAPE, math.nan))


def test_iw_asl_in_the_papers_and_the_authors_squared_form_through_the_config():
    """iw-ASL as a training config asks for it (issue 20): ``loss_params: {squared: true}`` is the
    authors' code, the default is Table 1. On the hand case with the given weights, β = 1.5:
      p = σ(x) = [.880797, .268941, .622459, .047426, .731059, .5, .119203, .952574]
      Σwpt = 5·.880797 + 5·.622459 + 2·.952574 = 9.421430 ; numerator (1 + β²)·Σwpt = 3.25·9.421430 = 30.619648
      β²Σwt = β²Σwt² = 2.25·(5 + 5 + 2) = 27 (t is binary)
      paper:   Σwp  = 5·.880797 + .268941 + 5·.622459 + .047426 + .731059 + .5 + .119203 + 2·.952574 = 11.088059
               1 − 30.619648 / (27 + 11.088059) = 1 − 30.619648 / 38.088059 = 0.196083
      squared: Σwp² = 5·.775803 + .072329 + 5·.387455 + .002249 + .534447 + .25 + .014209 + 2·.907397 = 8.504325
               1 − 30.619648 / (27 + 8.504325) = 1 − 30.619648 / 35.504325 = 0.137580
    """
    from IWSegmentationLib.training import TrainConfig

    for params, expected in (({}, 0.196083), ({"squared": False}, 0.196083), ({"squared": True}, 0.137580)):
        config = TrainConfig(loss="iw-asl", loss_params=params)
        config.validate()
        loss = get_loss(config.loss, **config.loss_params)
        assert float(loss(X, T, W)) == pytest.approx(expected, abs=2e-6), params
