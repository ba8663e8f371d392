"""Model selection from checkpoint records (DomainBed's rules) and Distill's starting checkpoint."""

from __future__ import annotations

import pytest

from vl2v.runtime import UserError
from vl2v.selection import SELECTIONS, get_selection, last, oracle, start_checkpoint, training_domain


def rec(step: int, tr: float, out0: float, in0: float) -> dict:
    return {"step": step, "tr_outacc": tr, "env0_out_acc": out0, "env0_in_acc": in0}


RECORDS = [rec(0, 0.2, 0.1, 0.10), rec(100, 0.6, 0.9, 0.50), rec(200, 0.6, 0.4, 0.60), rec(300, 0.5, 0.9, 0.70), rec(400, 0.4, 0.2, 0.80)]


def test_training_domain_validation_takes_the_first_maximum():
    assert training_domain(RECORDS, 0)["step"] == 100  # 0.6 at 100 and 200: the first


def test_oracle_takes_the_first_maximum_of_the_held_out_out_split():
    assert oracle(RECORDS, 0)["step"] == 100
    with pytest.raises(UserError, match="needs a held-out domain"):
        oracle(RECORDS, None)


def test_last_takes_the_final_checkpoint():
    assert last(RECORDS, 0)["step"] == 400


def test_selection_names_and_unknown_one():
    assert list(SELECTIONS) == ["training-domain", "oracle", "last"]
    assert get_selection("oracle")[0] == "test-domain validation (oracle)"
    with pytest.raises(UserError, match=r"Unknown --selection 'orcale'\. Did you mean 'oracle'\?"):
        get_selection("orcale")


@pytest.mark.parametrize(
    "model_save, last_step, expected",
    [
        (100, 400, 200),  # ties at 0.6 (steps 100, 200) go to the later
        (0, 400, 200),
        (150, 400, 200),  # step 100 is below model_save
        (250, 400, 300),  # only 300 and 400 qualify
        (5000, 400, 400),  # a run shorter than model_save: its last checkpoint
    ],
)
def test_distill_start_checkpoint(model_save, last_step, expected):
    assert start_checkpoint(RECORDS, model_save, last_step)["step"] == expected
