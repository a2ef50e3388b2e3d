"""The training recipe: augmentation keeps HR and LR aligned, the EMA weights are what the checkpoint holds, and a
self-ensemble restricted to the identity is the plain output."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hndsr.checkpoint import load_network, save_network
from hndsr.degradation import degrade
from hndsr.metrics import psnr
from hndsr.model import DIHEDRAL, IDENTITY, apply_transform, undo_transform
from hndsr.raster import DataSpec
from hndsr.splits import Levels, PairSet, TileSet
from tests.hndsr.test_model import _model
from training.config import StageParams
from training.data import CropSampler
from training.trainers import Context, _loop, train_autoencoder


def _tiles(n=3, size=20, dtype="float32", seed=0) -> TileSet:
    pixels = torch.from_numpy(np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32))
    return TileSet(pixels, Levels.of(DataSpec.fixed(), [dtype] * n))


def _locate(tiles: torch.Tensor, hr: torch.Tensor):
    """The (transform, tile, y, x) whose crop of `tiles`, transformed, is `hr` (random pixels: exactly one)."""
    crop = hr.shape[-1]
    found = [(t, i, y, x) for t in DIHEDRAL for i in range(tiles.shape[0])
             for y in range(tiles.shape[-2] - crop + 1) for x in range(tiles.shape[-1] - crop + 1)
             if torch.equal(tiles[i, :, y : y + crop, x : x + crop], undo_transform(hr, t))]
    assert len(found) == 1, found
    return found[0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), crop=st.sampled_from([8, 12, 16]), dtype=st.sampled_from(["float32", "uint8"]))
def test_augmented_pairs_stay_aligned(seed, crop, dtype):
    """Every training pair is a flipped/turned crop of a stored tile, and its LR is that crop's LR turned the same
    way: the augmentation moves HR and LR together, pixel for pixel."""
    tiles = _tiles(dtype=dtype)
    lr, hr, scale = CropSampler(tiles, crop=crop, batch_size=6, scale_range=(2.0, 4.0), seed=seed).batch()
    for lr_tile, hr_tile in zip(lr, hr, strict=True):
        transform, i, y, x = _locate(tiles.pixels, hr_tile)
        original = tiles.pixels[i : i + 1, :, y : y + crop, x : x + crop]
        expected = apply_transform(degrade(original, scale), transform)  # the stored crop's LR, turned
        if dtype == "uint8":  # LR quantised to the stored type's 256 levels, as the ETL stores it
            expected = tiles.levels.select([i]).quantize(expected)
            assert (lr_tile - expected[0]).abs().max() <= 1 / 255 + 1e-6  # a rounding tie may fall either way
            assert (lr_tile - expected[0]).abs().gt(1e-6).float().mean() < 0.02
        else:
            torch.testing.assert_close(lr_tile, expected[0], atol=1e-6, rtol=0)


def test_augmentation_draws_all_eight_orientations():
    tiles = _tiles()
    sampler = CropSampler(tiles, crop=12, batch_size=64, scale_range=(2.0, 4.0), seed=1)
    assert {_locate(tiles.pixels, hr)[0] for hr in sampler.hr_batch()} == set(DIHEDRAL)


def test_ema_follows_the_trained_weights_and_ends_in_the_network():
    """_loop with `ema`: the network ends holding the moving average of the weights after every step (warm-up as
    training.ema.EMA), and the last evaluation scored that average, not the last step's weights."""
    decay, steps, seen = 0.9, 7, []
    network = torch.nn.Linear(3, 2)
    params = StageParams(iterations=steps, batch_size=4, lr=0.05, eval_every=steps, ema=decay)
    data = torch.randn(4, 3)

    def loss_fn():
        seen.append([p.detach().clone() for p in network.parameters()])  # the weights after the previous step
        return network(data).square().mean()

    def report(step, metrics):  # runs after the evaluation: the trained weights are back in place
        seen.append([p.detach().clone() for p in network.parameters()])

    def evaluate():
        return {"val_score": float(sum(p.sum() for p in network.parameters()))}

    history = _loop("test", params, {}, network, _context(_tiles()), None, loss_fn, evaluate, report)
    shadow = seen[0]
    for n, weights in enumerate(seen[1:]):
        d = min(decay, (1 + n) / (10 + n))
        shadow = [d * s + (1 - d) * w for s, w in zip(shadow, weights, strict=True)]
    for param, expected in zip(network.parameters(), shadow, strict=True):
        torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=0)
    assert not torch.equal(network.weight.detach(), seen[-1][0])  # not the last step's weights
    assert history[-1]["val_score"] == pytest.approx(float(sum(s.sum() for s in shadow)), abs=1e-5)


def _context(tiles: TileSet) -> Context:
    val_hr = tiles.pixels[:2, :, :16, :16]
    val = {2.0: PairSet(2.0, degrade(val_hr, 2.0), val_hr, ["a", "b"])}
    return Context(tiles, val, (2.0, 4.0), torch.device("cpu"), amp=False)


def test_the_checkpoint_holds_the_scored_ema_weights(tmp_path):
    """A trainer with `ema` returns the averaged network with the score of those weights, and the checkpoint
    written from it loads back the same weights."""
    params = StageParams(iterations=6, batch_size=2, crop=8, lr=1e-2, eval_every=3, model={"width": 8}, ema=0.5)
    ctx = _context(_tiles(size=16))
    result = train_autoencoder(params, {}, ctx, lambda step, metrics: None, seed=0)
    plain = train_autoencoder(dataclasses.replace(params, ema=0.0), {}, ctx, lambda step, metrics: None, seed=0)
    assert not torch.equal(result.network.enc_linear.weight, plain.network.enc_linear.weight)
    val = ctx.val[2.0].hr
    assert result.score == pytest.approx(psnr(result.network(val).clamp(0, 1), val).mean().item(), abs=1e-4)
    save_network(tmp_path, "autoencoder", result.network)
    loaded, _ = load_network(tmp_path, "autoencoder")
    for saved, trained in zip(loaded.parameters(), result.network.parameters(), strict=True):
        assert torch.equal(saved, trained)


def test_self_ensemble_of_the_identity_is_the_plain_output():
    model, lr = _model(), torch.rand(2, 3, 10, 14)
    for steps in (0, 2):
        plain = model.super_resolve(lr, 2.5, steps=steps, seed=3)
        assert torch.equal(model.super_resolve(lr, 2.5, steps=steps, seed=3, ensemble=[IDENTITY]), plain)
        full = model.super_resolve(lr, 2.5, steps=steps, seed=3, ensemble=DIHEDRAL)
        assert full.shape == plain.shape and not torch.equal(full, plain)  # the other seven passes count


def test_self_ensemble_is_the_mean_of_the_transformed_passes():
    model, lr = _model(), torch.rand(1, 3, 9, 12)
    transform = (True, 1)  # mirrored and turned: the pass runs on a 12 x 9 LR, its output turned back
    one = model.super_resolve(lr, 3.0, steps=2, seed=1, ensemble=[transform])
    by_hand = undo_transform(model.super_resolve(apply_transform(lr, transform), 3.0, steps=2, seed=1), transform)
    assert one.shape == (1, 3, 27, 36) and torch.equal(one, by_hand)
    pair = model.super_resolve(lr, 3.0, steps=2, seed=1, ensemble=[IDENTITY, transform])
    torch.testing.assert_close(pair, (model.super_resolve(lr, 3.0, steps=2, seed=1) + by_hand) / 2)
    with pytest.raises(ValueError, match="DIHEDRAL"):
        model.super_resolve(lr, 3.0, ensemble=[(False, 5)])
