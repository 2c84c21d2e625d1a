"""Smoke test of benchmarks/inference_quality.py: each part at a tiny size (outputs, columns, finiteness), and
the closed-form references it relies on."""

import csv
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import inference_quality as iq  # noqa: E402

from pyro_avf import IterativeGuide  # noqa: E402
from pyro_avf.baselines.kalman import expected_step_free_energy, step_optimum  # noqa: E402
from pyro_avf.evaluation import filtering_free_energy  # noqa: E402
from pyro_avf.models.lgssm import LinearGaussianSSM  # noqa: E402

TINY = ["--steps", "2", "--T", "4", "--test-sequences", "6", "--batch-size", "4", "--num-iterations", "2",
        "--guide-kwargs", '{"hidden_size": 16}', "--adam-kwargs", '{"num_iterations": 4}']  # fmt: skip
NUMERIC = ("gap", "se", "prior_gap", "prior_se", "free_energy", "reference")


def read(path: Path):
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == iq.COLUMNS
    for r in rows:
        for key in NUMERIC:
            assert math.isfinite(float(r[key])), (r["config"], key, r[key])
    return rows


@pytest.mark.parametrize(
    "part, extra, configs",
    [
        ("defaults", ["--grid", '{"hw": {}, "res/err/obs": {"update": "residual", "encoding": "error", '
                      '"encode_observation": true}}'], {"hw", "res/err/obs", "prior", "adam4"}),  # fmt: skip
        ("coupled", [], {"default", "prior", "adam4"}),
        ("nonlinear", ["--reference-kwargs", '{"num_iterations": 5}', "--check-iterations", "3"],
         {"default", "adam4", "reference@5", "reference@3"}),  # fmt: skip
    ],
)
def test_part_runs_and_writes_tidy_outputs(tmp_path, part, extra, configs, capsys):
    returned = iq.main(["--part", part, "--out-dir", str(tmp_path), *TINY, *extra])
    stem = tmp_path / f"inference_quality_{part}"
    rows = read(stem.with_suffix(".csv"))
    assert stem.with_suffix(".png").stat().st_size > 0
    assert len(rows) == len(returned)
    assert {r["config"] for r in rows} == configs
    models = {"defaults": {"lgssm"}, "coupled": {"coupled", "single_site"}, "nonlinear": {"lotka_volterra"}}[part]
    assert {r["model"] for r in rows} == models
    for model in models:  # each amortized config at checkpoints 0 and 2; each fixed method once
        for config in configs:
            steps = sorted(int(r["step"]) for r in rows if r["config"] == config and r["model"] == model)
            kind = {r["kind"] for r in rows if r["config"] == config}
            assert steps == ([0, 2] if kind == {"amortized"} else [0])
    if part == "nonlinear":
        assert all(math.isfinite(float(r["unpaired_gap"])) for r in rows)
    out = capsys.readouterr().out
    assert "held-out gap" in out and ("goal" in out) == (part == "coupled")


def test_recording_lgssm_program_is_the_library_model():
    ssm = LinearGaussianSSM.random(4, 8, seed=0)
    m = iq.LGSSMProgram(ssm)
    xs = m.sample(5, 3, seed=1)
    values = []
    for model in (m.model, ssm.model):
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        guide = IterativeGuide(model, num_iterations=2, hidden_size=8)
        with iq.seeded(3):
            values.append(filtering_free_energy(model, guide, xs)["free_energy"])
    torch.testing.assert_close(values[0], values[1])
    assert m.recorded_z_prev(3).shape == (5, 3, 4)
    assert torch.all(m.recorded_z_prev(3)[:, 0] == 0)


def test_coupled_closed_form():
    m = iq.CoupledChain(seed=0)
    A_w, C_w, Q_w, R = m.stacked()
    z_prev, xs = torch.randn(7, 2), torch.randn(7, 4)
    w_prev = torch.cat([z_prev, torch.zeros(7, 2)], -1)
    opt = step_optimum(A_w, C_w, Q_w, R, w_prev, xs)
    torch.testing.assert_close(opt.precision[0], m.step_precision(), rtol=1e-4, atol=1e-4)
    best = m.best_diagonal(xs[:, None], z_prev[:, None])[:, 0]
    scale = torch.diagonal(opt.precision, dim1=-2, dim2=-1).rsqrt()
    at_best = expected_step_free_energy(A_w, C_w, Q_w, R, w_prev, xs, opt.mean, scale)
    torch.testing.assert_close(best, at_best, rtol=1e-4, atol=1e-3)
    worse = expected_step_free_energy(A_w, C_w, Q_w, R, w_prev, xs, opt.mean + 0.1, scale * 1.2)
    assert torch.all(worse > best)


def test_grid_parsing():
    assert len(iq.parse_grid(None, "defaults", {})) == 12
    grid = iq.parse_grid('{"a": {"update": "residual"}, "b": {}}', "coupled", {"hidden_size": 8})
    assert grid == {"a": {"hidden_size": 8, "update": "residual"}, "b": {"hidden_size": 8}}
    assert iq.parse_grid(None, "nonlinear", {"networks": "joint"}) == {"default": {"networks": "joint"}}
