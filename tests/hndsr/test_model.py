import json

import pytest
import torch

from hndsr.checkpoint import CheckpointError, load_model, load_network, save_network, upstream_hashes
from hndsr.degradation import hr_size
from hndsr.model import HNDSR, SamplingDefaults
from hndsr.networks import (
    AttentionBlock,
    Autoencoder,
    AutoencoderConfig,
    DiffusionUNet,
    NeuralOperator,
    OperatorConfig,
    SpectralConv2d,
    UNetConfig,
)
from hndsr.scheduler import DDIMScheduler


def _model(seed=0) -> HNDSR:
    torch.manual_seed(seed)
    ae = Autoencoder(AutoencoderConfig(latent_channels=4, width=8, blocks=1))
    ae.fit_linear(torch.rand(2, 3, 16, 16))
    op = NeuralOperator(OperatorConfig(latent_channels=4, width=8, modes=4, layers=2))
    torch.nn.init.normal_(op.project[-1].weight, std=0.01)  # not the zero start, so the operator matters
    unet = DiffusionUNet(UNetConfig(latent_channels=4, width=8, emb_dim=16))
    torch.nn.init.normal_(unet.out.weight, std=0.1)  # not the zero start, so sampling matters
    return HNDSR(ae, op, unet, DDIMScheduler(), min_scale=2, max_scale=4,
                 defaults=SamplingDefaults(steps=2, temperature=0.5)).eval()


@pytest.mark.parametrize("scale", [2.0, 2.5, 3.0, 3.7, 4.0])
@pytest.mark.parametrize(("height", "width"), [(16, 16), (13, 21), (30, 7)])
@pytest.mark.parametrize("steps", [0, 2])
def test_output_size_follows_the_size_rule(scale, height, width, steps):
    out = _model().super_resolve(torch.rand(2, 3, height, width), scale, steps=steps, seed=1)
    assert out.shape == (2, 3, hr_size(height, scale), hr_size(width, scale))
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_same_seed_same_output_and_steps_change_it():
    model, lr = _model(), torch.rand(1, 3, 12, 12)
    a = model.super_resolve(lr, 2.5, steps=3, seed=7)
    assert torch.equal(a, model.super_resolve(lr, 2.5, steps=3, seed=7))
    assert not torch.equal(a, model.super_resolve(lr, 2.5, steps=3, seed=8))
    assert not torch.equal(a, model.super_resolve(lr, 2.5, steps=0))


def test_scale_outside_the_trained_range_is_refused():
    with pytest.raises(ValueError, match=r"outside the trained range \[2.0, 4.0\]"):
        _model().super_resolve(torch.rand(1, 3, 8, 8), 6.0)
    with pytest.raises(ValueError, match="greater than 1"):
        _model().super_resolve(torch.rand(1, 3, 8, 8), 1.0)


def test_autoencoder_linear_start_is_near_lossless_on_its_data():
    # Constant 2x2 blocks: 3 degrees of freedom per block, which 8 principal components hold exactly.
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), scale_factor=2, mode="nearest")
    ae = Autoencoder(AutoencoderConfig(latent_channels=8))
    ae.fit_linear(images)
    latent = ae.encode(images)
    assert latent.shape == (4, 8, 8, 8)
    assert (ae.decode(latent) - images).abs().max() < 1e-3
    # Whitened: each component that carries variance has unit variance over the data (3 here).
    channel_std = latent.detach().transpose(0, 1).flatten(1).std(1)
    assert torch.allclose(channel_std[:3], torch.ones(3), atol=0.01)


@pytest.mark.parametrize("modes", [1, 3, 8, 40])
@pytest.mark.parametrize(("height", "width"), [(4, 4), (9, 14), (32, 17)])
def test_spectral_conv_works_on_any_grid_and_keeps_only_low_modes(modes, height, width):
    layer = SpectralConv2d(2, 3, modes)
    out = layer(torch.randn(1, 2, height, width))
    assert out.shape == (1, 3, height, width)
    # A pure high-frequency input (Nyquist checkerboard) passes only if `modes` reaches that frequency.
    if modes < height // 2 and modes < width // 2:
        y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        nyquist = (((x + y) % 2) * 2 - 1).float().expand(1, 2, height, width)
        if height % 2 == 0 and width % 2 == 0:
            assert layer(nyquist).abs().max() < 1e-4


def _spectral_reference(layer: SpectralConv2d, x: torch.Tensor) -> torch.Tensor:
    """The Fourier layer as written in the FNO paper: a complex einsum per kept mode, positive and negative rows."""
    batch, _, height, width = x.shape
    x_ft = torch.fft.rfft2(x, norm="ortho")
    m1, m2 = min(layer.modes, height // 2), min(layer.modes, width // 2 + 1)
    out = torch.zeros(batch, layer.weight_pos.shape[1], height, width // 2 + 1, dtype=x_ft.dtype)
    w_pos = torch.view_as_complex(layer.weight_pos[:, :, :m1, :m2].contiguous())
    w_neg = torch.view_as_complex(layer.weight_neg[:, :, :m1, :m2].contiguous())
    out[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], w_pos)
    out[:, :, height - m1 :, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, height - m1 :, :m2], w_neg)
    return torch.fft.irfft2(out, s=(height, width), norm="ortho")


@pytest.mark.parametrize("modes", [1, 3, 12])
@pytest.mark.parametrize(("height", "width"), [(4, 4), (9, 14), (48, 48), (31, 20)])
def test_spectral_conv_real_matmul_is_the_complex_product_per_mode(modes, height, width):
    torch.manual_seed(modes)
    layer = SpectralConv2d(5, 3, modes)
    x = torch.randn(2, 5, height, width, requires_grad=True)
    ours, reference = layer(x), _spectral_reference(layer, x)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), [x, layer.weight_pos, layer.weight_neg])
    expected = torch.autograd.grad(reference.square().sum(), [x, layer.weight_pos, layer.weight_neg])
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_attention_block_is_spans_parameter_free_attention():
    torch.manual_seed(0)
    block = AttentionBlock(4)
    x = torch.randn(2, 4, 9, 7)
    c1, c2, c3 = block.convs
    out = c3(torch.nn.functional.silu(c2(torch.nn.functional.silu(c1(x)))))
    assert torch.allclose(block(x), (out + x) * (torch.sigmoid(out) - 0.5))
    for conv in block.convs:  # convolutions answering nothing: the attention is zero everywhere, so is the block
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    assert torch.equal(block(x), torch.zeros_like(x))


def test_operator_with_attention_blocks_runs_on_any_grid_and_round_trips(tmp_path):
    torch.manual_seed(0)
    op = NeuralOperator(OperatorConfig(latent_channels=4, width=8, modes=4, layers=2, block="attention"))
    torch.nn.init.normal_(op.project[-1].weight, std=0.01)
    assert all(isinstance(local, AttentionBlock) for local in op.local)
    for height, width in [(16, 16), (26, 42)]:
        assert op(torch.rand(1, 3, height, width), torch.tensor([2.5])).shape == (1, 4, height // 2, width // 2)
    save_network(tmp_path / "operator", "operator", op)
    loaded, meta = load_network(tmp_path / "operator", "operator")
    assert meta["config"]["block"] == "attention"
    x = torch.rand(2, 3, 20, 24)
    assert torch.equal(loaded(x, torch.tensor([2.0, 4.0])), op(x, torch.tensor([2.0, 4.0])))
    with pytest.raises(ValueError, match="operator block 'spam': choose one of conv, attention"):
        OperatorConfig(block="spam")


def test_checkpoint_round_trip_rebuilds_from_config(tmp_path):
    model = _model()
    models = tmp_path / "models"
    save_network(models / "autoencoder", "autoencoder", model.autoencoder)
    save_network(models / "operator", "operator", model.operator,
                 extra={"upstream": upstream_hashes("operator", models), "scale_range": [2.0, 4.0]})
    save_network(models / "diffusion", "diffusion", model.unet,
                 extra={"upstream": upstream_hashes("diffusion", models), "scale_range": [2.0, 4.0],
                        "sampling": {"steps": 2, "eta": 0.0, "temperature": 0.5},
                        "scheduler": {"num_train_timesteps": 1000, "prediction_type": "sample"}})
    assert not list(models.rglob("*.pt")) and not list(models.rglob("*.pkl"))
    loaded = load_model(models)
    lr = torch.rand(1, 3, 10, 14)
    assert torch.equal(loaded.super_resolve(lr, 3.0, seed=3), model.super_resolve(lr, 3.0, seed=3))
    assert loaded.defaults == model.defaults
    config = json.loads((models / "operator" / "config.json").read_text())
    assert config["config"] == {"channels": 3, "latent_channels": 4, "width": 8, "modes": 4, "layers": 2,
                                "block": "conv"}
    assert config["code_version"]
    # A checkpoint written before `block` existed loads as what it was: one 3x3 convolution per layer.
    del config["config"]["block"]
    (models / "operator" / "config.json").write_text(json.dumps(config))
    operator, _ = load_network(models / "operator", "operator")
    assert operator.config.block == "conv"
    assert torch.equal(operator(lr.expand(1, 3, 10, 14), torch.tensor([3.0])),
                       model.operator(lr, torch.tensor([3.0])))


def test_stale_or_missing_upstream_is_refused(tmp_path):
    model = _model()
    models = tmp_path / "models"
    with pytest.raises(CheckpointError, match="no autoencoder checkpoint"):
        load_model(models)
    save_network(models / "autoencoder", "autoencoder", model.autoencoder)
    save_network(models / "operator", "operator", model.operator,
                 extra={"upstream": upstream_hashes("operator", models), "scale_range": [2.0, 4.0]})
    retrained = _model(seed=1).autoencoder
    save_network(models / "autoencoder", "autoencoder", retrained)
    with pytest.raises(CheckpointError, match="trained on a different autoencoder checkpoint"):
        load_model(models, with_diffusion=False)
    with pytest.raises(CheckpointError, match="expected 'operator'"):
        load_network(models / "autoencoder", "operator")


def test_untrained_unet_and_zero_strength_leave_the_prior():
    model, lr = _model(), torch.rand(1, 3, 12, 12)
    prior_only = model.super_resolve(lr, 3.0, steps=0)
    assert torch.equal(model.super_resolve(lr, 3.0, steps=2, strength=0.0, seed=1), prior_only)
    half = model.super_resolve(lr, 3.0, steps=2, strength=0.5, seed=1)
    full = model.super_resolve(lr, 3.0, steps=2, strength=1.0, seed=1)
    assert 0 < (half - prior_only).abs().mean() < (full - prior_only).abs().mean()
    fresh = DiffusionUNet(UNetConfig(latent_channels=4, width=8, emb_dim=16))  # output layer starts at zero
    model.unet = fresh
    assert torch.allclose(model.super_resolve(lr, 3.0, steps=2, seed=1), prior_only, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_per_element_seeds_make_results_independent_of_the_batch(eta):
    model, images = _model(), torch.rand(3, 3, 12, 14)
    alone = [model.super_resolve(images[i : i + 1], 3.0, steps=2, seed=[10 + i], eta=eta) for i in range(3)]
    batched = model.super_resolve(images, 3.0, steps=2, seed=[10, 11, 12], eta=eta)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], alone[i], rtol=0, atol=1e-6)
    # An int seed keeps its meaning: one generator for the batch, as before.
    torch.testing.assert_close(model.super_resolve(images[:1], 3.0, steps=2, seed=[10], eta=eta),
                               model.super_resolve(images[:1], 3.0, steps=2, seed=10, eta=eta), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        model.super_resolve(images, 3.0, steps=2, seed=[1, 2])


def test_callback_after_every_step_can_stop_sampling_and_clamp_is_optional():
    model, seen = _model(), []
    model.super_resolve(torch.rand(1, 3, 8, 8), 2.0, steps=3, callback=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    with pytest.raises(Stop):
        model.super_resolve(torch.rand(1, 3, 8, 8), 2.0, steps=3, callback=stop)
    raw = model.super_resolve(torch.rand(1, 3, 8, 8) * 4 - 2, 2.0, steps=0, clamp=False)
    assert raw.min() < 0 or raw.max() > 1  # out-of-range input: the raw decoder output is not clamped
