"""Smoke tests of the issue-3 benchmark scripts at tiny sizes, on real JSB and MuseData data.

The important one is the equivalence of the plain-PyTorch AVF loop with the library: same networks, same
seed -> same loss, final free energies and gradients; independent seeds -> free energies that agree within
Monte-Carlo error.
"""

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pyro
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory  # noqa: E402
import music  # noqa: E402
import music_curves  # noqa: E402
import music_table  # noqa: E402
import plain_torch_srnn_avf as plain  # noqa: E402
import speed  # noqa: E402
import speed_breakdown  # noqa: E402
import svg  # noqa: E402

from pyro_avf import AmortizedFilteringELBO, IterativeGuide  # noqa: E402
from pyro_avf.models.srnn import SRNN  # noqa: E402

if not (ROOT.parent / "shared" / "data" / "polyphonic").is_dir():
    pytest.skip("the shared polyphonic data are not available", allow_module_level=True)


def tiny_pair(k: int, likelihood: str = "bernoulli", encode_observation: bool = False):
    """A tiny SRNN, its IterativeGuide (update network built by a first call) and 8 JSB crops with padding."""
    srnn = SRNN.music(d_dim=24, a_dim=24, hidden_dim=24, z_dim=6, likelihood=likelihood)
    # one sample per inference gradient: the algorithm the plain-torch reference implements
    guide = IterativeGuide(srnn.model, num_iterations=k, hidden_size=24, encode_observation=encode_observation,
                           num_samples=1)  # fmt: skip
    xs, mask = plain.jsb_crops(8, 12, seed=3)
    mask[0, 9:] = False  # padding at the end of one crop
    xs[0, 9:] = 0.0
    AmortizedFilteringELBO().differentiable_loss(srnn.model, guide, xs, mask)  # builds the update network
    return srnn, guide, xs, mask


@pytest.mark.parametrize(
    "k, likelihood, encode_observation", [(1, "bernoulli", False), (3, "bernoulli", False), (2, "gaussian", True)]
)
def test_plain_loop_equals_library_for_same_seed(k, likelihood, encode_observation):
    srnn, guide, xs, mask = tiny_pair(k, likelihood, encode_observation)
    assert guide.update_nets["slot0"].obs_dim == (88 if encode_observation else 0)
    update = guide.update_nets["slot0"]
    params = list(srnn.generative.parameters()) + list(update.parameters())
    elbo = AmortizedFilteringELBO(kl_weight=0.5)
    torch.manual_seed(7)
    lib_loss = elbo.differentiable_loss(srnn.model, guide, xs, mask)
    lib_grads = torch.autograd.grad(lib_loss, params)
    torch.manual_seed(7)
    out = plain.avf_loss(srnn, update, xs, mask, k, kl_weight=0.5)
    grads = torch.autograd.grad(out.loss, params)
    assert out.free_energy.shape == (8, 12)
    assert torch.all(out.free_energy[0, 9:] == 0)
    torch.testing.assert_close(out.loss, lib_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.free_energy, elbo.diagnostics["free_energy"][..., -1], rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, lib_grads):  # θ from the final free energy, φ from every iteration's
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_plain_loop_matches_library_within_monte_carlo_error():
    srnn, guide, xs, mask = tiny_pair(2)
    update = guide.update_nets["slot0"]
    elbo = AmortizedFilteringELBO()
    steps = mask.sum().item()
    torch.manual_seed(11)
    lib = torch.tensor([elbo.loss(srnn.model, guide, xs, mask) / steps for _ in range(12)])
    torch.manual_seed(12345)  # independent draws
    ours = torch.tensor([plain.avf_loss(srnn, update, xs, mask, 2).free_energy.sum().item() / steps for _ in range(12)])
    stderr = math.sqrt(lib.var() / len(lib) + ours.var() / len(ours))
    assert stderr > 0
    assert abs(lib.mean() - ours.mean()) < 4 * stderr + 1e-6


def test_plain_loop_training_lowers_free_energy():
    torch.manual_seed(0)
    out = plain.main(["--steps", "8", "--batch-size", "8", "--crop-length", "12", "--iterations", "2",
                      "--hidden-size", "32", "--model-size", "32", "--lr", "3e-3"])  # fmt: skip
    losses = out["free_energy_per_step"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0  # 88 untrained Bernoulli keys start near 61 nats per step


def test_plain_loop_rejects_bad_input():
    srnn = SRNN.music(d_dim=8, a_dim=8, hidden_dim=8, z_dim=4)
    update = plain.UpdateNetwork(4, hidden=8)
    with pytest.raises(ValueError, match="num_iterations"):
        plain.avf_loss(srnn, update, torch.zeros(2, 3, 88), None, 0)


@pytest.mark.parametrize("config", ["music", "speech"])
def test_speed_reports_medians_and_ratios(config):
    out = speed.main(["--reps", "2", "--warmup", "1", "--batch-size", "2", "--crop-length", "3", "--hidden-size",
                      "16", "--model-size", "16", "--config", config])  # fmt: skip
    assert set(out["median_seconds"]) == {"library_avf_k1", "library_avf_k5", "library_avf_k1_pair",
                                          "library_avf_k5_pair", "baseline", "plain_avf_k1", "plain_avf_k5"}
    assert all(0 < s < 10 for s in out["median_seconds"].values())
    assert set(out["ratios"]) == set(speed.RATIOS)
    assert all(0 < r["q25"] <= r["median"] <= r["q75"] for r in out["ratios"].values())
    assert out["reps"] == 2
    assert pyro.get_param_store().keys() == set()  # every method kept its parameters in its own scope


def test_speed_breakdown_times_each_part_and_restores_the_functions():
    from pyro_avf import inference, updates

    originals = [getattr(obj, attr) for parts in speed_breakdown.PARTS.values() for obj, attr, _ in parts]
    out = speed_breakdown.main(["--reps", "2", "--batch-size", "2", "--crop-length", "3", "--hidden-size", "16",
                                "--model-size", "16"])  # fmt: skip
    library, plain_parts = out["library_avf_k1"], out["plain_avf_k1"]
    assert {"inference re-runs of the step", "update network", "scoring the final run"} <= set(library)
    assert "step free energy (decoder + KL)" in plain_parts and "scoring the final run" not in plain_parts
    for parts in (library, plain_parts):
        timed = [v for k, v in parts.items() if k not in ("forward pass", "backward pass", "other (forward)")]
        assert all(v > 0 for v in timed) and sum(timed) < parts["forward pass"]
    assert [getattr(obj, attr) for parts in speed_breakdown.PARTS.values() for obj, attr, _ in parts] == originals
    assert inference.StepInference._run is originals[0] and updates.UpdateNetwork.forward is originals[2]


def test_speech_timing_setting_uses_speech_sizes_and_observation_encoding():
    methods = speed.build_methods(hidden_size=8, model_size=8, config="speech")
    xs, mask = speed.speech_frames(3, 5)
    assert xs.shape == (3, 5, 200) and bool(mask.all())
    guide = methods["library_avf_k1"].loss_fn.objective.guide
    assert guide.encode_observation and guide.update_nets["slot0"].obs_dim == 200
    assert guide.update_nets["slot0"].dim == 256  # SRNN.speech's z_dim


def test_memory_measures_avf_in_a_fresh_process_and_the_baseline_guide():
    rows = memory.main(["--lengths", "20", "--guides", "avf_k5", "--hidden-size", "16", "--model-size", "16"])
    rows.append(memory.child("baseline", 20, hidden_size=16, model_size=16))  # in this process, to save time
    assert [(r["guide"], r["steps"]) for r in rows] == [("avf_k5", 20), ("baseline", 20)]
    assert all(r["peak_extra_mb"] >= 0 and r["seconds"] > 0 for r in rows)
    for r in rows:  # untrained: about 88 log 2 ≈ 61 nats per step
        assert 30 < r["free_energy_per_step"] < 120
    with pytest.raises(ValueError, match="3401 steps"):
        memory.long_sequence(5000)


def test_memory_slope_is_growth_per_thousand_steps():
    rows = [{"guide": "g", "steps": 500, "peak_extra_mb": 10.0}, {"guide": "g", "steps": 2000, "peak_extra_mb": 13.0},
            {"guide": "h", "steps": 500, "peak_extra_mb": 4.0}]  # fmt: skip
    assert memory.slopes(rows) == {"g": pytest.approx(2.0)}


def test_music_table_has_both_normalisations_and_resumes_unfinished_runs(tmp_path):
    """Two rows per run (ours and the paper's normalisation) in the CSV of the issue's columns; a run stopped by
    its invocation budget is resumed by the next invocation, and only a finished run reaches the CSV."""
    csv = tmp_path / "music.csv"
    options = ["--max-eval-songs", "2", "--out-root", str(tmp_path / "runs"),
               "--csv", str(csv), "--extra", "--model-size", "16", "--z-dim", "4", "--hidden-size", "16",
               "--max-train-batches", "1"]  # fmt: skip
    table = music.main(["--epochs", "1", "--methods", "baseline", "avf_k1", *options])
    assert list(table.columns) == music.COLUMNS and len(table) == 4
    assert sorted(table["normalisation"]) == ["paper", "paper", "per_step", "per_step"]
    assert table["test_free_energy_per_step"].between(5, 70).all() and (table["epochs"] == 1).all()
    ours, paper = (table[table["normalisation"] == n].set_index("inference") for n in ("per_step", "paper"))
    assert (paper["test_free_energy_per_step"] != ours["test_free_energy_per_step"]).all()
    table = music.main(["--epochs", "2", "--methods", "avf_k1", *options])  # resumed from epoch 1, rows replaced
    assert len(table) == 4 and table.groupby("inference")["epochs"].max().to_dict() == {"avf": 2, "baseline": 1}
    assert table.groupby("inference")["updates"].max().to_dict() == {"avf": 2, "baseline": 1}
    lines = music.markdown(table).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| jsb_chorales | avf_k1 | 0 | 2 |") and lines[2].endswith("6.97 |")


def test_music_curves_find_the_best_epoch_and_the_gain_of_the_last_quarter(tmp_path):
    epochs = list(range(1, 21))
    valid = [None if e % 5 else v for e, v in zip(epochs, [0] * 4 + [9.0] + [0] * 4 + [8.0] + [0] * 4 + [8.5]
                                                    + [0] * 4 + [7.6])]  # validated every 5 epochs
    pd.DataFrame({"epoch": epochs, "epoch_valid_free_energy_per_step": valid}).to_csv(
        tmp_path / "srnn-piano_midi-avf_k5-seed1-e400.csv", index=False)
    flat = [None if e % 5 else 7.0 for e in epochs]
    pd.DataFrame({"epoch": epochs, "epoch_valid_free_energy_per_step": flat}).to_csv(
        tmp_path / "srnn-piano_midi-baseline-seed0.csv", index=False)
    out = tmp_path / "curves.png"
    table = music_curves.main([str(p) for p in sorted(tmp_path.glob("*.csv"))] + ["--out", str(out)])
    rows = table.set_index("method")
    assert rows.loc["avf_k5", ["best", "best_epoch", "seed", "tag"]].tolist() == [7.6, 20, 1, "e400"]
    assert rows.loc["avf_k5", "last_quarter_gain"] == pytest.approx(0.4)  # best by epoch 15: 8.0
    assert rows.loc["baseline", "last_quarter_gain"] == 0.0 and rows.loc["baseline", "tag"] == ""
    assert out.stat().st_size > 10_000
    (tmp_path / "bad.csv").write_text("epoch\n1\n")
    with pytest.raises(ValueError, match="expected srnn-"):
        music_curves.summarise(tmp_path / "bad.csv")


def test_music_table_selects_each_method_on_validation_not_on_test(tmp_path):
    def history(name, valid, test, paper, config=None):
        pd.DataFrame({"epoch": [1, 2], "cpu_time_s": [1.0, 7200.0], "best_epoch": [None, 2],
                      "valid_free_energy_per_step": [None, valid], "test_free_energy_per_step": [None, test],
                      "test_free_energy_paper": [None, paper]}).to_csv(tmp_path / f"{name}.csv", index=False)
        if config is not None:
            (tmp_path / f"{name}.config.json").write_text(json.dumps(config))

    base = {"model_size": 128, "z_dim": 32, "crop_length": 25}
    history("srnn-jsb_chorales-baseline-seed0", 7.4, 7.3, 7.2, base)
    history("srnn-jsb_chorales-baseline-seed0-d0.5", 7.1, 7.5, 7.0, {**base, "dropout": 0.5})  # worse test
    history("srnn-jsb_chorales-avf_k5-seed0", 7.0, 6.9, 6.77, base)
    history("srnn-jsb_chorales-avf_k5-seed0-p4", 7.05, 6.5, 6.4, {**base, "lr_drop_patience": 4})  # valid worse
    pd.DataFrame({"epoch": [1], "valid_free_energy_per_step": [6.0]}).to_csv(  # never tested: left out
        tmp_path / "srnn-jsb_chorales-avf_k5-seed0-e800.csv", index=False)
    chosen = music_table.main([str(p) for p in sorted(tmp_path.glob("*.csv"))]).set_index("method")
    assert chosen.loc["baseline", ["dropout", "test", "candidates"]].tolist() == [0.5, 7.5, 2]
    assert chosen.loc["baseline", "gap_percent"] == pytest.approx(100 * (7.0 / 6.92 - 1))
    assert chosen.loc["avf_k5", ["candidates", "cpu_hours", "test"]].tolist() == [2, 2.0, 6.9]
    lines = music_table.markdown(chosen.reset_index()).splitlines()
    assert lines[2].startswith("| jsb_chorales | avf_k5 | 0 | 128/32, 0, 25, — | 2 | 2 (2) |")

    history("srnn-jsb_chorales-baseline-seed1", 7.3, 7.2, 7.1, base)
    history("srnn-jsb_chorales-avf_k5-seed1", 7.0, 7.4, 7.25, base)  # above the baseline at this seed
    history("srnn-jsb_chorales-avf_k5-seed2", 7.0, 7.0, 6.9, base)  # no baseline of seed 2: not paired
    chosen = music_table.main([str(p) for p in sorted(tmp_path.glob("*.csv"))])
    summary = music_table.over_seeds(chosen).set_index("method")
    assert summary.loc["avf_k5", ["seeds", "paired", "test_below_baseline"]].tolist() == [3, 2, 1]
    assert summary.loc["avf_k5", "test_mean"] == pytest.approx((6.9 + 7.4 + 7.0) / 3)
    assert summary.loc["avf_k5", "test_vs_baseline"] == pytest.approx(((6.9 - 7.5) + (7.4 - 7.2)) / 2)
    assert summary.loc["avf_k5", "test_paper_sd"] == pytest.approx(pd.Series([6.77, 7.25, 6.9]).std())
    assert summary.loc["baseline", "seeds"] == 2 and summary.loc["baseline", "test_vs_baseline"] == 0.0
    rows = music_table.seeds_markdown(summary.reset_index()).splitlines()
    assert rows[2].startswith("| jsb_chorales | avf_k5 | 3 | 7.100 ± 0.265 |") and "(1 of 2)" in rows[2]


def test_svg_learning_curves_at_equal_steps(tmp_path):
    curve = tmp_path / "curve.csv"
    results = svg.main(["--steps", "2", "--curve-every", "1", "--num-train", "8", "--num-test", "4", "--frames", "4",
                        "--frame-size", "16", "--g-dim", "8", "--rnn-size", "8", "--nf", "4", "--curve", str(curve),
                        "--out", str(tmp_path / "svg.md")])  # fmt: skip
    assert {m: r["steps"] for m, r in results.items()} == {"AVF": 2, "baseline": 2}
    rows = pd.read_csv(curve)
    assert sorted(zip(rows["method"], rows["steps"])) == [("AVF", 1), ("AVF", 2), ("baseline", 1), ("baseline", 2)]
    assert rows.groupby("method")["train_seconds"].apply(lambda x: x.is_monotonic_increasing).all()
    assert curve.with_suffix(".png").stat().st_size > 10_000
