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


def stepped(total_steps, steps, peak=1e-3, warmup_steps=2, on_resume_change="extend", **shape):
    """A scheduler of `total_steps` after `steps` optimizer steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_esm2_scheduler(
        optimizer, warmup_steps=warmup_steps, total_steps=total_steps, on_resume_change=on_resume_change, **shape
    )
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler


def resumed(saved_state, total_steps, until, **kwargs):
    """The learning rates a scheduler of `total_steps` follows from `saved_state` on, up to step `until`."""
    scheduler = stepped(total_steps, 0, **kwargs)
    scheduler.load_state_dict(saved_state)
    values = {scheduler.last_epoch: scheduler.get_last_lr()[0]}
    while scheduler.last_epoch < until:
        scheduler.optimizer.step()
        scheduler.step()
        values[scheduler.last_epoch] = scheduler.get_last_lr()[0]
    return values


def test_resuming_with_the_same_schedule_follows_it_exactly_and_says_nothing(caplog):
    straight = stepped(20, 20)
    state = stepped(20, 8).state_dict()
    with caplog.at_level("WARNING"):
        values = resumed(state, 20, 20)
    assert values[20] == straight.get_last_lr()[0] and values[8] == stepped(20, 8).get_last_lr()[0]  # bit for bit
    assert caplog.text == ""


def test_extending_a_finished_run_goes_on_at_the_floor_without_a_jump(caplog):
    """ESM-2's shape over 20 steps ends at 10% of the peak (from step 18); 30 steps would put step 20 at 35%."""
    finished = stepped(20, 20).state_dict()
    with caplog.at_level("WARNING"):
        values = resumed(finished, 30, 30)
    assert values == pytest.approx(dict.fromkeys(range(20, 31), 1e-4), rel=1e-12)
    assert esm2_lr_factor(20, warmup_steps=2, total_steps=30) == pytest.approx(0.352)  # what a recomputation gave
    assert (
        "The learning-rate schedule differs from the checkpoint's (num_train_steps 20 -> 30). The next step's "
        "learning rate is 0.0001 (the checkpoint's schedule: 0.0001): lr_scheduler.on_resume_change=extend goes on "
        "from there to the configured floor at step 27; =restart would give 0." in caplog.text
    )


def test_restart_warms_up_and_decays_again_over_the_remaining_steps():
    values = resumed(stepped(20, 20).state_dict(), 30, 30, on_resume_change="restart")
    assert values[20] == 0.0 and values[21] == pytest.approx(5e-4) and values[22] == pytest.approx(1e-3)
    assert values[25] == pytest.approx(1e-3 * (1 - 0.9 * 3 / 7))  # the decay ends at 20 + int(0.9 * 10) = 29
    assert values[29] == pytest.approx(1e-4) and values[30] == pytest.approx(1e-4)


def test_extending_mid_decay_goes_on_from_the_current_rate_to_the_new_end():
    state = stepped(100, 50, warmup_steps=10).state_dict()  # linear decay 10 -> 90; at 50: 1 - 0.9 * 0.5
    values = resumed(state, 200, 200, warmup_steps=10)
    assert values[50] == pytest.approx(5.5e-4)
    assert values[115] == pytest.approx((5.5e-4 + 1e-4) / 2)  # halfway to the floor at 0.9 * 200 = 180
    assert values[180] == pytest.approx(1e-4) and values[200] == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(values.values()))


def test_extending_during_warm_up_reaches_the_peak_where_the_new_warm_up_ends():
    state = stepped(100, 20, warmup_steps=100).state_dict()  # 20% of the peak
    values = resumed(state, 100, 40, warmup_steps=40)
    assert values[20] == pytest.approx(2e-4) and values[30] == pytest.approx(6e-4) and values[40] == pytest.approx(1e-3)


def test_a_new_peak_and_floor_apply_from_the_resume_step_on():
    state = stepped(100, 50, warmup_steps=10).state_dict()  # 5.5e-4 at step 50
    values = resumed(state, 100, 100, warmup_steps=10, peak=2e-3, min_lr_ratio=0.25)
    assert values[50] == pytest.approx(5.5e-4)  # no jump to the new peak's schedule (1.1e-3)
    assert values[90] == pytest.approx(5e-4) and values[100] == pytest.approx(5e-4)  # 25% of the new peak
    assert values[70] == pytest.approx((5.5e-4 + 5e-4) / 2)


def test_a_second_extension_goes_on_from_the_first():
    first = resumed(stepped(20, 20).state_dict(), 30, 30)  # at the floor, 1e-4
    scheduler = stepped(30, 0)
    scheduler.load_state_dict(stepped(20, 20).state_dict())
    for _ in range(5):
        scheduler.optimizer.step()
        scheduler.step()
    again = resumed(scheduler.state_dict(), 30, 30)  # the same 30-step schedule: the continuation travels along
    assert again == pytest.approx({step: first[step] for step in range(25, 31)}, rel=1e-12)
    longer = resumed(scheduler.state_dict(), 60, 60, min_lr_ratio=0.05)
    assert longer[25] == pytest.approx(1e-4) and longer[54] == pytest.approx(5e-5)


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
