import pytest
import torch

from hndsr.degradation import degrade, hr_size, is_exact, lr_size

SCALES = [2.0, 2.5, 3.0, 4.0]


@pytest.mark.parametrize("scale", SCALES)
def test_size_rule_is_exact_for_the_default_tile(scale):
    lr = lr_size(120, scale)
    assert lr == {2.0: 60, 2.5: 48, 3.0: 40, 4.0: 30}[scale]
    assert hr_size(lr, scale) == 120
    assert is_exact(120, scale)


@pytest.mark.parametrize(("hr", "scale", "lr"), [(128, 3.0, 43), (128, 2.5, 51), (101, 2.0, 51), (7, 4.0, 2)])
def test_size_rule_rounds_half_up_when_not_exact(hr, scale, lr):
    assert lr_size(hr, scale) == lr
    assert not is_exact(hr, scale)


def test_size_rule_never_returns_zero():
    assert lr_size(1, 4.0) == 1


@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0, float("nan"), float("inf")])
def test_scales_at_or_below_one_are_refused(scale):
    with pytest.raises(ValueError, match="greater than 1"):
        lr_size(120, scale)
    with pytest.raises(ValueError, match="greater than 1"):
        degrade(torch.zeros(1, 3, 8, 8), scale)


@pytest.mark.parametrize("scale", SCALES + [3.7])
def test_degrade_shapes_on_non_square_input(scale):
    hr = torch.rand(2, 3, 120, 90)
    lr = degrade(hr, scale)
    assert lr.shape == (2, 3, lr_size(120, scale), lr_size(90, scale))
    assert lr.min() >= 0.0 and lr.max() <= 1.0


def test_degrade_keeps_a_constant_image_constant():
    hr = torch.full((1, 3, 60, 60), 0.3)
    assert torch.allclose(degrade(hr, 2.5), torch.full((1, 3, 24, 24), 0.3), atol=1e-6)


def test_degrade_low_pass_filters_instead_of_aliasing():
    # A one-pixel checkerboard has no content below Nyquist: antialiased downscaling must average it to grey,
    # where plain decimation would keep a full-contrast pattern.
    y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    hr = ((x + y) % 2).float().expand(1, 3, 64, 64)
    lr = degrade(hr, 4.0)
    assert (lr - 0.5).abs().max() < 0.02


def test_degrade_is_deterministic():
    hr = torch.rand(1, 3, 120, 120, generator=torch.Generator().manual_seed(0))
    assert torch.equal(degrade(hr, 2.5), degrade(hr.clone(), 2.5))


def test_degrade_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        degrade(torch.zeros(3, 8, 8), 2.0)
