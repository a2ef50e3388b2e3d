"""The diffusion stage's default sampling: the declared trade-off (training.trainers.pick) on validation tables."""

from __future__ import annotations

import pytest

from training.config import DiffusionExtras
from training.trainers import pick

EXTRAS = DiffusionExtras(max_psnr_cost=0.4, min_gain_over_bicubic=0.1, min_gmsd_gain=0.02)


def row(steps, gmsd, cost=0.0, gain=0.5, temperature=0.5, strength=0.5):
    return {"steps": steps, "temperature": None if steps == 0 else temperature,
            "strength": None if steps == 0 else strength, "max_psnr_cost": cost, "min_gain_over_bicubic": gain,
            "gmsd": gmsd, "eligible": cost <= EXTRAS.max_psnr_cost and gain >= EXTRAS.min_gain_over_bicubic}


def test_steps_win_when_they_lower_gmsd_by_the_margin():
    table = [row(0, 0.100), row(4, 0.097, strength=0.25), row(4, 0.095, cost=0.2, strength=0.5)]
    assert pick(table, EXTRAS) is table[2]  # 5 % lower, within the PSNR cost


def test_steps_that_buy_less_than_the_margin_leave_the_default_at_zero():
    table = [row(0, 0.100), row(4, 0.0985), row(8, 0.099)]
    assert pick(table, EXTRAS)["steps"] == 0


def test_a_setting_that_costs_too_much_psnr_or_gain_is_not_eligible_however_sharp():
    table = [row(0, 0.100), row(4, 0.050, cost=0.5), row(4, 0.060, gain=0.05)]
    assert pick(table, EXTRAS)["steps"] == 0


def test_ties_go_to_the_cheaper_setting():
    table = [row(0, 0.100), row(4, 0.100, strength=0.0)]
    assert pick(table, EXTRAS)["steps"] == 0


def test_when_the_prior_itself_is_not_eligible_the_best_eligible_setting_is_taken():
    table = [row(0, 0.100, gain=0.05), row(4, 0.0995, gain=0.12)]
    assert pick(table, EXTRAS) is table[1]


def test_nothing_eligible_takes_the_cheapest_in_psnr():
    table = [row(0, 0.100, gain=0.0), row(4, 0.090, cost=0.6, gain=0.0)]
    assert pick(table, EXTRAS)["steps"] == 0


@pytest.mark.parametrize("margin, expected", [(0.0, 4), (0.05, 0)])
def test_the_margin_is_the_params_value(margin, expected):
    extras = DiffusionExtras(max_psnr_cost=0.4, min_gain_over_bicubic=0.1, min_gmsd_gain=margin)
    table = [row(0, 0.100), row(4, 0.097)]
    assert pick(table, extras)["steps"] == expected
