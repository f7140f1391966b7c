"""The public surface: what `import numpyro_amortized as na` offers."""

import subprocess
import sys

import pytest

import numpyro_amortized as na


def test_public_names():
    assert set(na.__all__) == {
        "AmortizedGuide",
        "AmortizedModel",
        "AmortizedPosterior",
        "BankMismatchError",
        "BayesianAmortizedGuide",
        "DiskBank",
        "EncoderGuide",
        "EpistemicSummary",
        "FlowDistribution",
        "History",
        "NotFittedError",
        "InvalidSimulationWarning",
        "LatentSpace",
        "ModelTraceError",
        "NumpySimulator",
        "NutsComparison",
        "PlateInfo",
        "SimulationError",
        "SimulationInfo",
        "SiteInfo",
        "__version__",
        "amortize",
        "bayesian_nnx_module",
        "compare_with_nuts",
        "diagnostics",
        "encoders",
        "load",
        "load_simulations",
        "networks",
        "random_bayesian_module",
        "save_simulations",
        "simulate_to_disk",
    }
    for name in na.__all__:
        assert hasattr(na, name), name


def test_import_has_no_side_effects():
    code = (
        "import logging, jax; before = jax.config.jax_enable_x64;"
        "import numpyro_amortized;"
        "assert jax.config.jax_enable_x64 == before;"
        "assert not logging.getLogger().handlers;"
        "import matplotlib, sys; assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow  # ~50 s; CI runs the demo itself (README's first command)
def test_demo_trains_and_writes_plots(tmp_path, capsys):
    from numpyro_amortized import demo

    out_dir = tmp_path / "demo"
    args = ["--num-steps", "500", "--no-progress", "--output", str(out_dir)]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "Posterior for a held-out dataset" in out and "draws/s" in out
    assert (out_dir / "loss.png").stat().st_size > 0
    assert (out_dir / "recovery.png").stat().st_size > 0
