"""The verdict of a NUTS comparison: reference convergence first, then accuracy,
and a speed ratio only when both hold (``numpyro_amortized.verdict``)."""

import pandas as pd
import pytest

from numpyro_amortized.verdict import assess, headline

GOOD = {"c2st": 0.52, "max_r_hat": 1.003, "min_ess_bulk": 900.0, "divergences": 0}


def _tables(rows, params=None):
    joint = pd.DataFrame(rows).rename_axis("dataset")
    if params is None:
        params = [{"mean_diff": 0.05, "sd_diff": 0.02}] * len(rows)
    index = pd.MultiIndex.from_tuples(
        [(b, "mu") for b in range(len(rows))], names=["dataset", "parameter"]
    )
    return pd.DataFrame(params, index=index), joint


def test_converged_and_matching_backs_the_speed_ratio():
    verdict = assess(*_tables([GOOD, GOOD]))
    assert verdict.status == "matches" and verdict.backs_speed
    assert "12x faster" in headline(verdict, "times", 12.0)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"max_r_hat": 1.29}, "r_hat 1.29 > 1.01"),
        ({"min_ess_bulk": 6.0}, "bulk ESS 6 < 100"),
        ({"divergences": 312}, "312 divergent transitions"),
        ({"max_r_hat": float("nan")}, "r_hat nan"),
    ],
)
def test_unconverged_reference_gives_no_verdict(bad, reason):
    # The amortized side looks terrible too: the reference still comes first.
    rows = [GOOD, {**GOOD, **bad, "c2st": 0.95}]
    verdict = assess(*_tables(rows))
    assert verdict.status == "no_verdict" and not verdict.backs_speed
    assert verdict.unconverged == (1,) and reason in verdict.reasons[1]
    line = headline(verdict, "times", 500.0)
    assert line.startswith("NO VERDICT") and "faster" not in line
    assert "dataset 1" in line and reason in line


def test_mismatch_by_c2st_gives_no_speed_claim():
    verdict = assess(*_tables([GOOD, {**GOOD, "c2st": 0.95}]))
    assert verdict.status == "differs" and verdict.mismatched == (1,)
    line = headline(verdict, "times", 500.0)
    assert line.startswith("DIFFERS") and "faster" not in line
    assert "C2ST 0.950 > 0.6" in line


@pytest.mark.parametrize(
    "params, status",
    [
        ({"mean_diff": 0.1, "sd_diff": -0.1}, "matches"),
        ({"mean_diff": 1.0, "sd_diff": 0.0}, "differs"),
        ({"mean_diff": 0.0, "sd_diff": -0.5}, "differs"),
    ],
)
def test_without_c2st_moments_decide(params, status):
    rows = [{**GOOD, "c2st": float("nan")}]
    assert assess(*_tables(rows, [params])).status == status


def test_single_dataset_tables():
    joint = pd.DataFrame([GOOD]).rename_axis("dataset")
    metrics = pd.DataFrame(
        {"mean_diff": [0.0, 0.1], "sd_diff": [0.0, 0.0]},
        index=pd.Index(["mu[0]", "mu[1]"], name="parameter"),
    )
    assert assess(metrics, joint).status == "matches"
    assert assess(metrics, joint, max_c2st=0.51).status == "differs"
