"""The command line on every model family and data set beyond music (pyro_avf.experiments): tiny end-to-end runs
on TIMIT, KTH and BAIR layouts written here, on Moving MNIST from the real MNIST digits and on simulated LG-SSM
sequences; the refusals of a model on a data set it does not fit and of a baseline without an own filter."""

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_data_timit import write_sphere, write_wav
from test_data_video import _trajectory, _write_avi, _write_tfrecord

from pyro_avf import experiments, train
from pyro_avf.evaluation import evaluate

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TINY = ("--z-dim 3 --model-size 8 --hidden-size 8 --iterations 1 --threads 1 --epochs 1 --max-train-batches 2 "
        "--batch-size 4 --eval-batch-size 2 --seed 1").split()  # fmt: skip
VIDEO = "--frame-size 16 --sequence-length 4".split()


def run(out_dir, *options, plots=False):
    row = train.main([*TINY, "--out-dir", str(out_dir), *options, *([] if plots else ["--no-plots"])])
    return row, pd.read_csv(Path(out_dir) / train.RESULTS)


def check_video_scores(results, frames, channels=1, size=16):
    """The video columns are the per-step free energy per clip and in nats per dimension of the 8-bit frames."""
    per_step = results["test_free_energy_per_step"].iloc[-1]
    assert math.isfinite(per_step) and results["test_steps"].iloc[-1] % frames == 0
    dims = channels * size * size
    assert results["test_free_energy_per_sequence"].iloc[-1] == pytest.approx(per_step * frames)
    assert results["test_nats_per_dim"].iloc[-1] == pytest.approx((per_step + dims * math.log(256)) / dims)


# ---------------------------------------------------------------------------------------------------------
# Speech


@pytest.fixture
def timit_root(tmp_path):
    """2 + 1 training clips of 40 steps (SPHERE and WAV files), test utterances of 15 and 10 steps."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus" / "timit"
    write_sphere(root / "TRAIN" / "DR1" / "FCJF0" / "SA1.WAV", rng.normal(0, 1000, 16_000).astype(np.int16))
    write_wav(root / "TRAIN" / "DR2" / "MDAB0" / "SI1.WAV", rng.normal(0, 1000, 9_000).astype(np.int16))
    write_wav(root / "TEST" / "DR1" / "FAKS0" / "SA2.WAV", rng.normal(0, 1000, 3_000).astype(np.int16))
    write_sphere(root / "TEST" / "DR4" / "MBDG0" / "SX2.WAV", rng.normal(0, 1000, 2_050).astype(np.int16))
    return root


@pytest.mark.parametrize("model, inference, extra", [("srnn", "avf", []), ("dmm", "baseline", ["--valid-every", "1"])])
def test_timit_trains_and_tests_the_speech_models(tmp_path, timit_root, model, inference, extra):
    # --data-dir may name the folder holding timit/ as well as the corpus root
    row, results = run(tmp_path / "run", "--model", model, "--dataset", "timit", "--inference", inference,
                       "--data-dir", str(timit_root.parent), *extra)  # fmt: skip
    assert results[["model", "dataset", "inference"]].values.tolist() == [[model, "timit", inference]]
    assert row["test_steps"] == 15 + 10  # whole test utterances, 200 samples a step
    assert math.isfinite(row["test_free_energy_per_step"]) and math.isfinite(row["train_loss_per_step"])
    if extra:  # TIMIT has no validation split: the last training clip is held out
        assert math.isfinite(row["valid_free_energy_per_step"])


def test_missing_timit_is_a_one_line_error_naming_the_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        train.main([*TINY, "--dataset", "timit", "--data-dir", str(tmp_path / "empty"), "--out-dir",
                    str(tmp_path / "run")])  # fmt: skip
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("TIMIT") and str(tmp_path / "empty" / "timit") in message and "--data-dir" in message
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# Video


@pytest.mark.parametrize(
    "model, inference",
    [("svg", "avf"), ("svg", "baseline"), ("slvm", "avf"), ("slvm-1af", "em"), ("1-af", "baseline"),
     ("2-af", "baseline")],
)  # fmt: skip
def test_moving_mnist_trains_and_tests_the_video_models(tmp_path, model, inference):
    row, results = run(tmp_path, "--model", model, "--dataset", "moving_mnist", "--inference", inference, *VIDEO,
                       "--train-sequences", "8", "--test-sequences", "2", "--data-dir", str(DATA),
                       plots=model == "svg")  # fmt: skip
    assert results[["model", "dataset", "inference"]].values.tolist() == [[model, "moving_mnist", inference]]
    assert row["test_steps"] == 2 * 4
    check_video_scores(results, frames=4)
    # untrained Gaussian frames: worse than the uniform density's log 256 nats/dim, but not absurdly so
    assert math.log(256) < row["test_nats_per_dim"] < 10
    if model == "svg":
        pngs = {p.name for p in tmp_path.glob("*.png")}
        assert "training_curves.png" in pngs and ("free_energy_per_iteration.png" in pngs) == (inference == "avf")


def test_the_flows_are_scored_on_their_exact_log_likelihood():
    args = train.build_parser().parse_args(["--model", "2-af", "--dataset", "moving_mnist", *VIDEO, "--model-size",
                                            "4", "--inference", "baseline"])  # fmt: skip
    flow = experiments.build_model(args)
    with torch.no_grad():
        for p in flow.parameters():  # away from the identity flows they start as
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(3, 4, 1, 16, 16)
    score = evaluate(flow, flow.guide, x, stream=experiments.stream_for(flow))
    assert experiments.stream_for(flow) is None and score.steps == 12
    assert score.per_step == pytest.approx(-flow.log_prob(x).sum().item() / 12, rel=1e-5)


@pytest.fixture
def kth_root(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    root = tmp_path / "kth"
    for action in ("boxing", "walking"):
        (root / action).mkdir(parents=True)
        for person, length in ((11, 12), (22, 8), (19, 4)):  # train, test, valid persons
            levels = [10 + 9 * t for t in range(length)]
            _write_avi(root / action / f"person{person:02d}_{action}_d1_uncomp.avi", levels)
    return root


def test_kth_trains_and_tests_a_video_model(tmp_path, kth_root, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # decoded frames are cached there
    row, results = run(tmp_path / "run", "--model", "slvm", "--dataset", "kth", "--data-dir", str(tmp_path), *VIDEO,
                       "--valid-every", "1")  # fmt: skip
    assert row["test_steps"] == 2 * 2 * 4  # two 8-frame test videos, two 4-frame clips each
    assert math.isfinite(row["valid_free_energy_per_step"])
    check_video_scores(results, frames=4)
    assert len(list((tmp_path / "cache" / "pyro_avf" / "kth").glob("*.npy"))) == 6


@pytest.fixture
def bair_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, files in (("train", 2), ("test", 1)):
        folder = tmp_path / "bair" / "softmotion30_44k" / split
        folder.mkdir(parents=True)
        for k in range(files):
            records = [_trajectory(rng, 4)[0] for _ in range(2)]
            _write_tfrecord(folder / f"traj_{2 * k}_to_{2 * k + 1}.tfrecords", records)
    return tmp_path


def test_bair_trains_and_tests_a_video_model_on_resized_rgb_frames(tmp_path, bair_root):
    row, results = run(tmp_path / "run", "--model", "svg", "--dataset", "bair", "--inference", "baseline",
                       "--data-dir", str(bair_root), *VIDEO)  # fmt: skip
    assert row["test_steps"] == 2 * 4
    check_video_scores(results, frames=4, channels=3)


# ---------------------------------------------------------------------------------------------------------
# Simulated LG-SSM


def test_lgssm_reports_the_exact_kalman_likelihood_beside_the_free_energy(tmp_path, capsys):
    row, results = run(tmp_path, "--model", "lgssm", "--dataset", "simulated", "--z-dim", "4", "--iterations", "2",
                       "--train-sequences", "8", "--test-sequences", "4", "--sequence-length", "10",
                       "--valid-every", "1")  # fmt: skip
    assert row["test_steps"] == 4 * 10
    nll, true_nll = row["test_kalman_nll_per_step"], row["true_kalman_nll_per_step"]
    assert math.isfinite(nll) and math.isfinite(true_nll)
    assert row["test_free_energy_per_step"] > nll  # the free energy bounds the learned model's exact NLL
    assert f"of the learned LG-SSM {nll:.4f} nats/step, of the true one {true_nll:.4f}" in capsys.readouterr().out
    assert results["test_kalman_nll_per_step"].notna().all()


# ---------------------------------------------------------------------------------------------------------
# Refusals and settings


@pytest.mark.parametrize(
    "options, message",
    [
        (["--model", "svg"], "--model svg does not fit --dataset jsb_chorales; the data sets of svg are: "
         "moving_mnist, kth, bair"),
        (["--model", "srnn", "--dataset", "bair"], "the data sets of srnn are: jsb_chorales, muse_data, nottingham, "
         "piano_midi, timit"),
        (["--model", "lgssm", "--dataset", "timit"], "the data sets of lgssm are: simulated"),
        (["--model", "slvm", "--dataset", "kth", "--inference", "baseline"], "--inference baseline trains the "
         "model's own filter, but --model slvm has none (no guide); use --inference avf"),
        (["--model", "lgssm", "--dataset", "simulated", "--inference", "baseline"], "--model lgssm has none"),
        (["--model", "1-af", "--dataset", "moving_mnist"], "--inference avf: --model 1-af has no latent variables "
         "to infer (its log-likelihood is exact); use --inference baseline"),
        (["--model", "svg", "--dataset", "moving_mnist", "--frame-size", "24"], "--frame-size must be a power of two"),
        (["--frame-size", "32"], "--frame-size applies to --dataset moving_mnist, kth, bair, not jsb_chorales"),
        (["--model", "svg", "--dataset", "bair", "--sequence-length", "31"], "a BAIR trajectory has 30 frames"),
        (["--model", "lgssm", "--dataset", "simulated", "--train-sequences", "0"], "--train-sequences must be a "
         "positive integer"),
    ],
)  # fmt: skip
def test_invalid_combinations_exit_with_a_message_naming_them(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exc:
        train.main(["--out-dir", str(tmp_path / "run"), *options])
    assert exc.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def test_run_settings_hold_the_data_options_of_their_data_set_only():
    music = train.run_config(train.parse_args(train.build_parser(), []))
    assert not {"frame_size", "sequence_length", "train_sequences", "data_seed"} & set(music)  # as before
    video = train.parse_args(train.build_parser(), ["--model", "svg", "--dataset", "moving_mnist"])
    config = train.run_config(video)
    assert {"frame_size", "sequence_length", "train_sequences", "test_sequences", "data_seed"} <= set(config)
    assert str(train.default_out_dir(video)).startswith(str(Path("runs") / "svg-moving_mnist-avf-k1-seed0-"))
    flow = train.parse_args(train.build_parser(), ["--model", "1-af", "--dataset", "kth", "--inference", "baseline"])
    assert train.default_out_dir(flow).name.startswith("1-af-kth-baseline-seed0-")
    smaller = train.parse_args(train.build_parser(), ["--model", "svg", "--dataset", "moving_mnist", "--frame-size",
                                                      "16"])  # fmt: skip
    assert train.default_out_dir(smaller) != train.default_out_dir(video)


def test_video_and_simulated_data_have_training_defaults_of_their_own_that_options_override():
    parse = functools.partial(train.parse_args, train.build_parser())
    music, video, lg = parse([]), parse(["--model", "svg", "--dataset", "kth"]), parse(["--model", "lgssm",
                                                                                         "--dataset", "simulated"])
    assert (music.lr, music.iterations, music.epochs) == (1e-4, 5, 800)  # the AVF paper's music settings
    assert (video.lr, video.iterations, video.kl_anneal_epochs, video.epochs) == (1e-3, 1, 1, 20)
    assert (lg.lr, lg.batch_size, lg.kl_anneal_epochs, lg.epochs) == (3e-3, 64, 0, 10)
    given = parse(["--model", "lgssm", "--dataset", "simulated", "--lr", "0.01", "--epochs", "3"])
    assert (given.lr, given.epochs, given.batch_size) == (0.01, 3, 64)
