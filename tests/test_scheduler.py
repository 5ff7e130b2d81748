import itertools

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
