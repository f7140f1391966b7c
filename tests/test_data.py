"""Observed data -> network input: the support-based input transforms."""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_amortized as na
from numpyro_amortized.codec import decode_layout, encode_layout
from numpyro_amortized.data import ObservationLayout, input_transform
from numpyro_amortized.models import choice_rt


@na.amortize(observed=["a", "b", "c", "d", "e"])
def mixed(a=None, b=None, c=None, d=None, e=None):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    numpyro.sample("a", dist.LogNormal(0.0, s).expand([3]).to_event(1), obs=a)
    numpyro.sample("b", dist.Beta(2.0, s + 1.0), obs=b)
    numpyro.sample("c", dist.Normal(0.0, s), obs=c)
    numpyro.sample("d", dist.Poisson(s), obs=d)
    numpyro.sample("e", dist.Uniform(-1.0, s), obs=e)


def layout_of(model) -> ObservationLayout:
    sites = model.describe()
    return ObservationLayout.from_sites([sites[n] for n in model.observed])


def test_transforms_follow_each_sites_support():
    sites = mixed.describe()
    got = {n: input_transform(sites[n]) for n in mixed.observed}
    assert got == {
        "a": "log",  # positive, inside to_event
        "b": "logit",  # unit interval
        "c": "identity",  # real
        "d": "identity",  # discrete
        "e": "identity",  # other intervals are left alone
    }


def test_to_network_applies_them_elementwise():
    layout = layout_of(choice_rt)
    assert layout.transforms == ("log", "identity")
    rng = np.random.default_rng(0)
    rt = rng.lognormal(size=(4, 50)).astype(np.float32)
    correct = rng.integers(0, 2, size=(4, 50)).astype(np.float32)
    x, mask = layout.to_network({"rt": rt, "correct": correct}, batch_ndim=1)
    assert mask is None and x.shape == (4, 50, 2)
    np.testing.assert_allclose(x[..., 0], np.log(rt), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(x[..., 1], correct)
    # Values on the boundary stay finite (clipped to the interior first).
    x0, _ = layout.to_network({"rt": np.zeros((1, 50)), "correct": correct[:1]}, 1)
    assert np.isfinite(np.asarray(x0)).all() and float(x0[0, 0, 0]) < -80


def test_values_outside_the_support_are_a_clear_error():
    layout = layout_of(choice_rt)
    rt = np.full((2, 50), 0.5, np.float32)
    rt[1, 3] = -0.2
    correct = np.ones((2, 50), np.float32)
    with pytest.raises(ValueError, match=r"'rt' has 1 value\(s\) outside its support"):
        layout.check_finite({"rt": rt, "correct": correct})
    mask = np.ones((2, 50), bool)
    mask[1, 3] = False  # a padded (missing) entry is not checked
    layout.check_finite({"rt": rt, "correct": correct, "rt_mask": mask})


def test_layout_round_trips_and_old_files_mean_identity():
    layout = layout_of(choice_rt)
    assert decode_layout(encode_layout(layout)) == layout
    old = encode_layout(layout)
    del old["transforms"]  # written before transforms existed
    legacy = decode_layout(old)
    assert legacy.transforms == () and legacy.transform_of("rt") == "identity"
    rt = np.full((1, 50), 2.0, np.float32)
    x, _ = legacy.to_network({"rt": rt, "correct": np.ones_like(rt)}, 1)
    np.testing.assert_allclose(x[..., 0], 2.0)
