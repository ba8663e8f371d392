"""LossValley against hand-worked loss curves.

Segment k averages the weights of steps 2k and 2k+1, and the live model's weight is set to the
step number (bias to minus it), so segment k's average is 2k + 0.5 and every expected final
weight below is a mean of such numbers, written out by hand from swad.py's rule.
"""

import logging

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from vl2v.swad import LossValley

STEPS_PER_SEGMENT = 2


def seg(k: int) -> float:
    """The average weight of segment k."""
    return 2 * k + 0.5


def set_step(model: nn.Linear, step: int) -> None:
    with torch.no_grad():
        model.weight.fill_(step)
        model.bias.fill_(-step)


def feed(valley: LossValley, model: nn.Linear, losses, first: int = 0, use_buffers=False) -> list:
    """Train-loop stand-in: one segment per loss; returns dead_valley after each checkpoint."""
    dead = []
    for k, loss in enumerate(losses, start=first):
        segment = AveragedModel(model, use_buffers=use_buffers)
        steps = range(k * STEPS_PER_SEGMENT, (k + 1) * STEPS_PER_SEGMENT)
        for step in steps:
            set_step(model, step)
            segment.update_parameters(model)
        valley.update_and_evaluate(segment, loss, steps[0], steps[-1])
        dead.append(valley.dead_valley)
        if valley.dead_valley:
            break
    return dead


def assert_weight(model: nn.Module, expected: float) -> None:
    torch.testing.assert_close(model.weight, torch.full((1, 2), expected))
    torch.testing.assert_close(model.bias, torch.full((1,), -expected))


# Both curves converge at checkpoint 6: losses of 4, 5, 6 are 1.0, 1.1, 1.2, the oldest is the
# lowest, so converge_step is segment 4's last step (9) and threshold = 1.3 * 1.1 = 1.43.
# Checkpoints 7 and 8 add nothing (oldest queued segment is older than the converge point);
# 9..13 add segments 4..8 (4 a second time if already in); at 14 the last six are all > 1.43.
DESCENT_THEN_RISE = [3.0, 1.35, 1.2, 1.1, 1.0, 1.1, 1.2, 1.3, 1.4, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
# At convergence the head of the window is segments 1..4 (1.35, 1.2, 1.1, 1.0): none above the
# threshold, so start_idx = 0 and swad.py adds head[1:] = 2, 3, 4 (segment 1 left out).
DESCENT_MEMBERS = [2, 3, 4, 4, 5, 6, 7, 8]
STEEP_THEN_RISE = [5.0, 4.0, 3.0, 2.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 3.0, 3.0, 3.0, 3.0, 3.0]
# Head is segments 1..4 (4, 3, 2, 1): segment 3 (i=2) is above, start_idx = 3, head[4:] is empty;
# the average starts from segment 4 with count 0, so 9..13 add 4, 5, 6, 7, 8; at 14 the min of
# segments 9..14 is 1.5 > 1.43.
STEEP_MEMBERS = [4, 5, 6, 7, 8]


@pytest.mark.parametrize(
    "losses, members, by_hand",
    # (4.5 + 6.5 + 8.5 + 8.5 + 10.5 + 12.5 + 14.5 + 16.5) / 8 and (8.5 + ... + 16.5) / 5
    [(DESCENT_THEN_RISE, DESCENT_MEMBERS, 10.25), (STEEP_THEN_RISE, STEEP_MEMBERS, 12.5)],
    ids=["gentle-descent", "steep-descent"],
)
def test_valley_converges_dies_and_averages_its_segments(losses, members, by_hand):
    valley = LossValley()
    dead = feed(valley, nn.Linear(2, 1), losses)

    assert valley.is_converged and valley.converge_step == 9
    assert valley.threshold == pytest.approx(1.3 * (1.0 + 1.1 + 1.2) / 3)
    assert dead == [False] * 14 + [True]
    assert sum(seg(k) for k in members) / len(members) == by_hand
    assert_weight(valley.get_final_model(), by_hand)


def test_never_converged_returns_last_segment(caplog):
    valley = LossValley()
    feed(valley, nn.Linear(2, 1), [5.0, 4.0, 3.0, 2.0, 1.0])

    assert not valley.is_converged and valley.threshold is None
    with caplog.at_level(logging.WARNING, logger="vl2v.swad"):
        final = valley.get_final_model()
    assert_weight(final, seg(4))
    assert not isinstance(final, AveragedModel)
    assert "never converged" in caplog.text


def test_training_ends_inside_valley_adds_the_tail():
    # Converges at 6 as above (members 2, 3, 4), adds 4 at 9 and 5 at 10, then training stops.
    # Tail: drop segment 5 (just added); of 6..10 (1.2, 1.3, 1.4, 1.3, 1.5) add 6, 7, 8, 9 while
    # the min of those left is <= 1.43; [10] alone is 1.5, so it stops there.
    losses = [3.0, 1.35, 1.2, 1.1, 1.0, 1.1, 1.2, 1.3, 1.4, 1.3, 1.5]
    valley = LossValley()
    feed(valley, nn.Linear(2, 1), losses)

    assert valley.is_converged and not valley.dead_valley
    members = [2, 3, 4, 4, 5, 6, 7, 8, 9]
    expected = sum(seg(k) for k in members) / len(members)
    assert expected == pytest.approx(100.5 / 9)
    assert_weight(valley.get_final_model(), expected)
    assert_weight(valley.get_final_model(), expected)  # asking twice changes nothing


def test_early_convergence_repeats_the_oldest_segment_until_window_fills():
    # Converges at checkpoint 2 (converge_step 1, threshold 1.43) with only 3 segments queued:
    # the head is segments 0..2, so 1 and 2 are added. Until the 6-window is full its oldest is
    # segment 0, added at 3, 4 and 5; then 1..7 at 6..12; at 13 the window 8..13 is all 2.0.
    losses = [1.0, 1.1, 1.2, 1.1, 1.2, 1.3, 1.3, 1.3, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    valley = LossValley()
    dead = feed(valley, nn.Linear(2, 1), losses)

    assert valley.converge_step == 1 and dead[-1] and len(dead) == 14
    members = [1, 2, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert sum(seg(k) for k in members) == 68.0
    assert_weight(valley.get_final_model(), 68.0 / 12)


@pytest.mark.parametrize(
    "n_converge, n_tolerance, members, dies_at",
    # (4, 2): converges at 3 (threshold 1.3 * 1.15 = 1.495), adds converge window [1:3] = 1, 2;
    # at 4 the 2-window (3, 4) has min 1.3 -> add 3; at 5 (4, 5) is all 5.0 -> dead.
    # (3, 3): converges at 2 (threshold 1.43) and adds nothing, so segment 0 is only a
    # placeholder; adds 1, 2, 3 at 3, 4, 5; at 6 the 3-window (4, 5, 6) is all 5.0 -> dead.
    [(4, 2, [1, 2, 3], 5), (3, 3, [1, 2, 3], 6)],
)
def test_other_window_sizes(n_converge, n_tolerance, members, dies_at):
    valley = LossValley(n_converge=n_converge, n_tolerance=n_tolerance)
    dead = feed(valley, nn.Linear(2, 1), [1.0, 1.1, 1.2, 1.3, 5.0, 5.0, 5.0])

    assert valley.converge_step == 1 and dead == [False] * dies_at + [True]
    assert_weight(valley.get_final_model(), sum(seg(k) for k in members) / len(members))


def test_queued_segments_are_frozen_cpu_copies_and_bounded():
    valley = LossValley()
    model = nn.Linear(2, 1)
    feed(valley, model, [5.0, 4.0, 3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6])
    set_step(model, 1000)  # training goes on after the last checkpoint

    assert len(valley._recent) == valley.n_tolerance
    assert all(p.device.type == "cpu" for s in valley._recent for p in s.module.parameters())
    assert_weight(valley.get_final_model(), seg(8))


@pytest.mark.parametrize("split", [2, 6, 8, 11])
def test_state_dict_round_trip_mid_curve(split, tmp_path):
    losses = DESCENT_THEN_RISE
    reference = LossValley()
    feed(reference, nn.Linear(2, 1), losses)

    first = LossValley()
    feed(first, nn.Linear(2, 1), losses[:split])
    path = tmp_path / "valley.pt"
    torch.save(first.state_dict(), path)
    resumed = LossValley()
    resumed.load_state_dict(torch.load(path, weights_only=True), template=nn.Linear(2, 1))
    feed(resumed, nn.Linear(2, 1), losses[split:], first=split)

    assert (resumed.converge_step, resumed.threshold, resumed.dead_valley) == (
        reference.converge_step,
        reference.threshold,
        reference.dead_valley,
    )
    for got, want in zip(
        resumed.get_final_model().parameters(), reference.get_final_model().parameters()
    ):
        assert torch.equal(got, want)


def test_state_dict_holds_plain_types_only():
    valley = LossValley()
    feed(valley, nn.Linear(2, 1), DESCENT_THEN_RISE[:8])

    def check(x):
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                check(v)
        elif isinstance(x, list):
            for v in x:
                check(v)
        else:
            assert isinstance(x, (torch.Tensor, int, float, str)), type(x)

    check(valley.state_dict())


def test_load_refuses_other_hyperparameters():
    state = LossValley(n_tolerance=6).state_dict()
    with pytest.raises(ValueError, match="n_tolerance"):
        LossValley(n_tolerance=5).load_state_dict(state, template=nn.Linear(2, 1))


def test_final_model_before_any_checkpoint_is_an_error():
    with pytest.raises(RuntimeError, match="update_and_evaluate"):
        LossValley().get_final_model()


class LinearBN(nn.Module):
    """nn.Linear's weight/bias surface (for set_step) followed by a frozen BatchNorm."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.bn = nn.BatchNorm1d(1)

    @property
    def weight(self):
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def forward(self, x):
        return self.bn(self.linear(x))


@pytest.mark.parametrize("use_buffers", [False, True])
def test_batchnorm_buffers_keep_values_and_dtypes(use_buffers):
    model = LinearBN()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.25)
        model.bn.running_var.fill_(4.0)
        model.bn.num_batches_tracked.fill_(7)
    model.bn.eval()  # frozen, as in training
    valley = LossValley()
    feed(valley, model, DESCENT_THEN_RISE, use_buffers=use_buffers)

    final = valley.get_final_model()
    assert_weight(final.linear, sum(seg(k) for k in DESCENT_MEMBERS) / len(DESCENT_MEMBERS))
    assert final.bn.num_batches_tracked.dtype == torch.long
    assert final.bn.num_batches_tracked.item() == 7
    assert final.bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(final.bn.running_mean, torch.tensor([0.25]))
    torch.testing.assert_close(final.bn.running_var, torch.tensor([4.0]))
    assert final.eval()(torch.ones(3, 2)).shape == (3, 1)
