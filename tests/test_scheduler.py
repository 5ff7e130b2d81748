import functools
import itertools
import math

import pytest
import torch

from scheduler import build_esm2_scheduler, esm2_lr_factor


def lrs(total_steps=1000, warmup_steps=100, peak=4e-4):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_esm2_scheduler(optimizer, warmup_steps=warmup_steps, total_steps=total_steps)
    values = [scheduler.get_last_lr()[0]]
    for _ in range(total_steps + 50):
        optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def test_warmup_rises_linearly_to_the_peak():
    values = lrs()
    assert values[0] == 0.0
    assert values[50] == pytest.approx(2e-4)
    assert values[100] == pytest.approx(4e-4)


def test_decay_is_linear_to_ten_percent_at_ninety_percent_of_training():
    values = lrs()
    # decay from step 100 (peak) to step 900 (10% of peak): halfway at step 500
    assert values[500] == pytest.approx(4e-4 * 0.55)
    assert values[900] == pytest.approx(4e-5)
    assert all(a >= b for a, b in itertools.pairwise(values[100:901]))


def test_flat_after_decay():
    values = lrs()
    assert values[901:] == pytest.approx([4e-5] * len(values[901:]))


def test_factor_without_warmup_starts_at_peak():
    assert esm2_lr_factor(0, warmup_steps=0, total_steps=10) == 1.0


def test_bad_arguments_are_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        build_esm2_scheduler(optimizer, warmup_steps=10, total_steps=0)
    with pytest.raises(ValueError, match="decay_fraction"):
        build_esm2_scheduler(optimizer, warmup_steps=10, total_steps=100, decay_fraction=1.5)


def cosine_lrs(total_steps=1000, warmup_steps=100, peak=1e-3):
    """AMPLIFY's shape: warm-up, then half a cosine to 10% of the peak at the last step (decay_fraction 1)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_esm2_scheduler(
        optimizer, warmup_steps=warmup_steps, total_steps=total_steps, decay_fraction=1.0, kind="cosine"
    )
    values = [scheduler.get_last_lr()[0]]
    for _ in range(total_steps + 50):
        optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def test_cosine_warms_up_linearly_then_follows_half_a_cosine_to_the_floor():
    values = cosine_lrs()
    assert values[50] == pytest.approx(5e-4)  # warm-up is linear, as for ESM-2
    assert values[100] == pytest.approx(1e-3)  # the peak at the end of warm-up
    assert values[325] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi / 4))))  # a quarter: 8.682e-4
    assert values[325] == pytest.approx(8.682e-4, rel=1e-4)
    assert values[550] == pytest.approx(5.5e-4)  # midpoint of the decay: halfway between peak and floor
    assert values[1000] == pytest.approx(1e-4)  # the end: 10% of the peak
    assert values[1001:] == pytest.approx([1e-4] * len(values[1001:]))
    assert all(a >= b for a, b in itertools.pairwise(values[100:1001]))


def test_cosine_decay_fraction_ends_the_decay_early():
    factor = functools.partial(esm2_lr_factor, warmup_steps=10, total_steps=110, decay_fraction=0.5, kind="cosine")
    assert factor(10) == 1.0
    assert factor(32) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 22 / 45)))
    assert factor(55) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)


def test_the_config_picks_the_schedule_kind():
    from conftest import compose

    from training import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(compose("L0_sanity_amplify"), optimizer)  # cosine, 10 warm-up steps of 100
    for _ in range(55):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(5.5e-4)
    with pytest.raises(ValueError, match="kind='step'"):
        build_esm2_scheduler(optimizer, warmup_steps=1, total_steps=10, kind="step")


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.25])
def test_the_config_sets_the_floor_the_decay_ends_at(min_lr_ratio):
    """lr_scheduler.min_lr_ratio reaches the schedule: the decay ends at that fraction of the peak and stays there."""
    from conftest import compose

    from training import build_scheduler

    overrides = ["num_train_steps=100", "lr_scheduler.warmup_steps=10", "lr_scheduler.decay_fraction=0.5"]
    cfg = compose("L0_sanity", [*overrides, f"lr_scheduler.min_lr_ratio={min_lr_ratio}", "optimizer.lr=1e-3"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    scheduler = build_scheduler(cfg, optimizer)
    values = [scheduler.get_last_lr()[0]]
    for _ in range(100):
        optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    floor = min_lr_ratio * 1e-3
    assert values[10] == pytest.approx(1e-3)  # the peak after warm-up
    assert values[30] == pytest.approx((1e-3 + floor) / 2)  # linear: halfway between peak and floor
    assert values[50:] == pytest.approx([floor] * 51, abs=1e-12)  # the floor from the decay's end (step 50) on
    assert values[49] > floor
