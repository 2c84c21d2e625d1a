"""The training command line on real JSB chorales at tiny sizes: end-to-end runs writing checkpoint, CSV and
plots; resuming an interrupted run reproduces the uninterrupted one; two DDP processes train to the same
parameters as one process on the same global batch; bad arguments fail with messages naming the option; run
folders are named by their settings, locked, written atomically and never overwritten silently; bad
checkpoints and data files end the command with one line naming them."""

import json
import math
import os
import signal
import socket
import struct
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from pyro import poutine

from data_loaders import polyphonic
from pyro_avf import train
from pyro_avf.plots import prediction_and_reconstruction
from pyro_avf.run_folder import RunFolder, atomic_write, config_digest
from pyro_avf.sequences import as_sequences

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TINY = (
    f"--data-dir {DATA} --z-dim 3 --model-size 12 --hidden-size 12 --iterations 2 --threads 1 "
    "--max-eval-songs 1 --eval-batch-size 1 --eval-every 1 --seed 3"
).split()
PNGS = {"training_curves.png", "free_energy_per_iteration.png", "piano_roll.png"}


def run(out_dir, *options):
    return train.main([*TINY, "--out-dir", str(out_dir), *options])


def load(out_dir):
    return torch.load(Path(out_dir) / train.CHECKPOINT, weights_only=True)


def assert_same_state(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.mark.parametrize(
    "model, inference, pngs",
    [("srnn", "avf", PNGS), ("dmm", "baseline", PNGS - {"free_energy_per_iteration.png"})],
)
def test_cli_writes_checkpoint_results_and_plots(tmp_path, model, inference, pngs):
    row = run(tmp_path, "--model", model, "--inference", inference, "--epochs", "2", "--max-train-batches", "2",
              "--batch-size", "4")  # fmt: skip
    results = pd.read_csv(tmp_path / train.RESULTS)
    assert list(results["epoch"]) == [1, 2]
    assert (results[["model", "dataset", "inference"]].values == [model, "jsb_chorales", inference]).all()
    # 88 Bernoulli keys of an untrained model: about 88 log 2 = 61 nats per step; test songs have real steps only
    assert results["test_free_energy_per_step"].between(20, 100).all()
    assert results["train_loss_per_step"].between(20, 100).all()
    assert (results["test_steps"] > 0).all() and results["wall_time_s"].is_monotonic_increasing
    assert results["lr"].tolist() == pytest.approx([1e-4, 1e-4 * 0.999])
    assert results["kl_weight"].tolist() == pytest.approx([1 / 50, 2 / 50])
    assert row["test_free_energy_per_step"] == pytest.approx(results["test_free_energy_per_step"].iloc[-1])
    ckpt = load(tmp_path)  # weights_only: plain tensors and containers only
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"] == model
    assert any(k.startswith("parts.guide.update_nets") for k in ckpt["net"]) == (inference == "avf")
    assert {p.name for p in tmp_path.glob("*.png")} == pngs
    assert all((tmp_path / p).stat().st_size > 5000 for p in pngs)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    options = ["--model", "srnn", "--inference", "avf", "--epochs", "2", "--max-train-batches", "2",
               "--batch-size", "4", "--no-plots", "--eval-every", "2"]  # fmt: skip
    run(tmp_path / "whole", *options)
    with pytest.raises(train.SimulatedKill):  # dies in epoch 2, after the epoch-1 checkpoint
        run(tmp_path / "cut", *options, "--simulate-kill-after", "3")
    assert load(tmp_path / "cut")["epoch"] == 1
    run(tmp_path / "cut", *options, "--resume")
    whole, cut = load(tmp_path / "whole"), load(tmp_path / "cut")
    assert cut["epoch"] == 2
    assert_same_state(whole["net"], cut["net"])
    assert whole["optimizer"]["state"].keys() == cut["optimizer"]["state"].keys()
    columns = ["epoch", "train_loss_per_step", "test_free_energy_per_step", "lr", "kl_weight"]
    a, b = (pd.read_csv(tmp_path / d / train.RESULTS)[columns] for d in ("whole", "cut"))
    pd.testing.assert_frame_equal(a, b)


def _zero_noise(shape, dtype, device):
    """Stand-in for the standard-Normal draws of ``rsample``: reparameterised Normal samples become their means,
    so one process and two see the same numbers (the noise streams of one 2b batch and of two b batches differ
    by construction); gradients still flow through the means."""
    return torch.zeros(shape, dtype=dtype, device=device)


def _ddp_worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributions.normal._standard_normal = _zero_noise
    train.main(argv)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    options = [*TINY, "--model", "srnn", "--inference", "avf", "--epochs", "1", "--max-train-batches", "3",
               "--batch-size", "4", "--no-plots", "--lr", "1e-2", "--max-eval-songs", "2"]  # fmt: skip
    mp.spawn(_ddp_worker, args=(2, _free_port(), [*options, "--out-dir", str(tmp_path / "ddp")]), nprocs=2)
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", _zero_noise)
    train.main([*options, "--out-dir", str(tmp_path / "one")])
    ddp, one = load(tmp_path / "ddp"), load(tmp_path / "one")
    assert_same_state(ddp["net"], one["net"], atol=1e-5)
    # and training moved the parameters (a lr of 1e-2 over 3 steps), so the comparison is not vacuous
    train.pyro.clear_param_store()
    train.pyro.set_rng_seed(3)
    args = train.build_parser().parse_args([*options, "--out-dir", str(tmp_path)])
    initial = train.build_model(args).generative.state_dict()
    moved = max((one["net"][f"parts.model.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3
    a, b = (pd.read_csv(tmp_path / d / train.RESULTS) for d in ("ddp", "one"))
    assert a["processes"].tolist() == [2] and b["processes"].tolist() == [1]
    for column in ("train_loss_per_step", "test_free_energy_per_step"):
        assert a[column].tolist() == pytest.approx(b[column].tolist(), rel=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr-decay", "1.5"], "--lr-decay must be in (0, 1]"),
        (["--inference", "em", "--iterations", "0"], "--inference em needs --iterations >= 1"),
        (["--inference", "autonormal"], "--inference autonormal does not make sense"),
        (["--model", "lstm"], "invalid choice: 'lstm'"),
        (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder is not a folder"),
        (["--resume", "--overwrite"], "--resume continues the run in the folder and --overwrite replaces it"),
    ],
)
def test_bad_arguments_exit_with_a_message_naming_the_option(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exc:
        train.main(["--out-dir", str(tmp_path), *options])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_refuses_a_missing_or_different_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        run(tmp_path, "--resume", "--epochs", "1")
    run(tmp_path, "--model", "dmm", "--inference", "baseline", "--epochs", "1", "--max-train-batches", "1",
        "--batch-size", "2", "--no-plots")  # fmt: skip
    with pytest.raises(SystemExit, match="--inference baseline"):
        run(tmp_path, "--model", "dmm", "--inference", "avf", "--epochs", "2", "--resume")


def test_time_budget_ends_the_run_after_one_batch_with_an_evaluation_and_a_checkpoint(tmp_path):
    run(tmp_path, "--model", "vrnn", "--inference", "em", "--epochs", "5", "--batch-size", "2", "--no-plots",
        "--max-minutes", "1e-6")  # fmt: skip
    results = pd.read_csv(tmp_path / train.RESULTS)
    assert results["epoch"].tolist() == [1] and results["inference"].tolist() == ["em"]
    songs = train.load_polyphonic("jsb_chorales", "test", path=DATA)[:1]
    assert results["test_steps"].tolist() == [sum(len(s) for s in songs)]  # whole songs, every real step
    ckpt = load(tmp_path)
    assert ckpt["epoch"] == 1 and not any("update_nets" in k for k in ckpt["net"])


def test_baseline_kl_weight_scales_only_the_latent_terms():
    """Trace_ELBO under ScaleLatents(β) is -log p(x|z) + β (log q(z) - log p(z)): linear in β at fixed noise,
    with β = 0 leaving the reconstruction term alone."""
    args = train.build_parser().parse_args([*TINY, "--model", "srnn", "--inference", "baseline"])
    train.pyro.clear_param_store()
    train.pyro.set_rng_seed(0)
    model = train.build_model(args)
    _, net = train.build_inference(args, model)
    songs = train.load_polyphonic("jsb_chorales", "test", path=DATA)[:3]
    xs, mask = as_sequences([s[:20] for s in songs]).batches(3)[0]
    losses = {}
    for beta in (0.0, 0.5, 1.0):
        net.objective.kl_weight = beta
        train.pyro.set_rng_seed(1)
        losses[beta] = net(xs, mask).item()
    assert losses[0.5] == pytest.approx((losses[0.0] + losses[1.0]) / 2, rel=1e-5)
    train.pyro.set_rng_seed(1)
    guide_trace = poutine.trace(model.guide).get_trace(xs, mask)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(xs, mask)
    nll = -sum(s["fn"].log_prob(s["value"]).sum() for s in model_trace.nodes.values() if s.get("is_observed"))
    assert losses[0.0] == pytest.approx(nll.item(), rel=1e-5)
    assert losses[1.0] != pytest.approx(losses[0.0], rel=1e-3)


def test_reconstruction_uses_the_final_posterior_and_prediction_the_prior():
    """With IterativeGuide the reconstruction is the observation mean under the final posterior mean (guide
    trace), not under the prior (the model trace's latent sites hold the priors): the two differ after K >= 1
    updates and match when K = 0."""
    songs = train.load_polyphonic("jsb_chorales", "test", path=DATA)[:1]
    xs, mask = songs[0][:12].unsqueeze(0), torch.ones(1, 12, dtype=torch.bool)
    for k in (2, 0):
        args = train.build_parser().parse_args([*TINY, "--model", "srnn", "--inference", "avf", "--iterations", str(k)])
        train.pyro.clear_param_store()
        train.pyro.set_rng_seed(0)
        model = train.build_model(args)
        guide, _ = train.build_inference(args, model)
        prediction, reconstruction = prediction_and_reconstruction(model.model, guide, xs, mask)
        assert prediction.shape == reconstruction.shape == xs.shape
        assert torch.allclose(prediction, reconstruction) == (k == 0)


def test_early_stopping_tests_the_parameters_with_the_best_validation_score(tmp_path):
    row = run(tmp_path, "--model", "srnn", "--inference", "avf", "--epochs", "3", "--max-train-batches", "2",
              "--batch-size", "4", "--no-plots", "--valid-every", "1", "--max-valid-songs", "2",
              "--lr", "0.05")  # fmt: skip
    results = pd.read_csv(tmp_path / train.RESULTS)
    best = torch.load(tmp_path / train.BEST, weights_only=True)
    assert row["tested_epoch"] == best["epoch"] and 1 <= best["epoch"] <= 3
    assert results["valid_free_energy_per_step"].is_monotonic_decreasing  # the best so far
    assert results["valid_free_energy_per_step"].between(1, 200).all()
    # evaluations use a fixed seed: the selected parameters give the number their own epoch's row gave
    same_epoch = results.loc[results["epoch"] == best["epoch"], "test_free_energy_per_step"].iloc[0]
    assert row["test_free_energy_per_step"] == pytest.approx(same_epoch, rel=1e-6)
    assert best["epoch"] < 3, "the test expects the unstable lr to make a later epoch worse on validation"


# ---------------------------------------------------------------------------------------------------------
# Run folders, locks, atomic writes, bad files (issue 11)

ONE_BATCH = ["--epochs", "1", "--max-train-batches", "1", "--batch-size", "2", "--no-plots"]


def _one_line_exit(exc_info) -> str:
    """The message of a SystemExit that carries one (a nonzero exit status): a single line."""
    message = exc_info.value.code
    assert isinstance(message, str) and message and "\n" not in message, message
    return message


def test_default_folders_identify_the_configuration_and_are_never_overwritten_silently(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.main([*TINY, *ONE_BATCH])
    train.main([*TINY, *ONE_BATCH, "--iterations", "1"])  # used to delete the first run's rows
    first, second = sorted((tmp_path / "runs").iterdir(), reverse=True)
    assert first.name.startswith("srnn-jsb_chorales-avf-k2-seed3-")
    assert second.name.startswith("srnn-jsb_chorales-avf-k1-seed3-")
    for folder, k in ((first, 2), (second, 1)):
        config = json.loads((folder / "config.json").read_text())
        assert config["iterations"] == k and config["lr"] == 1e-4 and "out_dir" not in config and "epochs" not in config
        assert folder.name.endswith("-" + config_digest(config))
        assert len(pd.read_csv(folder / train.RESULTS)) == 1
    assert f"results in {Path('runs') / first.name}: test free energy " in capsys.readouterr().out.splitlines()[0]

    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(SystemExit) as exc:  # the same settings again
        train.main([*TINY, *ONE_BATCH])
    message = _one_line_exit(exc)
    assert str(Path("runs") / first.name) in message and "--resume" in message and "--overwrite" in message
    with pytest.raises(SystemExit) as exc:  # resuming it with other settings is refused, naming them
        train.main([*TINY, *ONE_BATCH, "--out-dir", str(first), "--resume", "--lr", "1e-3", "--crop-length", "10"])
    assert "--crop-length 25 (now 10), --lr 0.0001 (now 0.001)" in _one_line_exit(exc)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before

    train.main([*TINY, *ONE_BATCH, "--overwrite"])  # on purpose
    assert (first / train.CHECKPOINT).read_bytes() != before[train.CHECKPOINT]
    assert len(pd.read_csv(first / train.RESULTS)) == 1


def _hold_folder(folder, ready):
    RunFolder.open(folder, {"holder": True})
    ready.set()
    time.sleep(120)


def test_a_second_run_in_a_locked_folder_is_refused_until_the_holder_dies(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_folder, args=(tmp_path / "run", ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(SystemExit) as exc:
            run(tmp_path / "run", *ONE_BATCH)
        assert f"{tmp_path / 'run'} is in use by another run (process {holder.pid})" in _one_line_exit(exc)
    finally:
        holder.kill()  # SIGKILL: the operating system drops the flock
        holder.join()
    run(tmp_path / "run", *ONE_BATCH)
    assert len(pd.read_csv(tmp_path / "run" / train.RESULTS)) == 1


def _killed_while_writing(path):
    with atomic_write(path, "w") as f:
        f.write("epoch,train_lo")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_kill_while_writing_leaves_the_old_files_and_resume_works(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, *ONE_BATCH, "--epochs", "1")
    results = (out / train.RESULTS).read_bytes()
    killed = mp.get_context("fork").Process(target=_killed_while_writing, args=(out / train.RESULTS,))
    killed.start()
    killed.join()
    assert killed.exitcode == -signal.SIGKILL
    assert (out / train.RESULTS).read_bytes() == results  # whole, not torn or empty
    assert len(list(out.glob(".results.csv.*.tmp"))) == 1  # what the kill left behind

    real_replace = os.replace

    def replace_fails_for_the_checkpoint(src, dst):
        if Path(dst).name == train.CHECKPOINT:
            raise OSError("disk full (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_for_the_checkpoint)
    with pytest.raises(OSError, match="simulated"):  # epoch 2 trains, writes its row, then cannot save
        run(out, *ONE_BATCH, "--epochs", "2", "--resume")
    monkeypatch.undo()
    assert load(out)["epoch"] == 1  # the old checkpoint, intact
    run(out, *ONE_BATCH, "--epochs", "2", "--resume")
    assert pd.read_csv(out / train.RESULTS)["epoch"].tolist() == [1, 2]
    assert load(out)["epoch"] == 2
    assert not list(out.glob("*.tmp"))  # the stale file was removed when the run opened the folder


def _forbidden_pickle(marker):
    # PROTO 2; GLOBAL os.system; BINUNICODE "touch <marker>"; TUPLE1; REDUCE; STOP
    command = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."


@pytest.mark.parametrize("kind", ["truncated", "text", "forbidden pickle", "tensor"])
def test_a_truncated_or_foreign_checkpoint_is_a_one_line_error_naming_it(tmp_path, kind):
    out = tmp_path / "run"
    out.mkdir()
    path = out / train.CHECKPOINT
    if kind == "truncated":
        torch.save({"version": 1, "net": {"w": torch.zeros(10_000)}}, path)
        path.write_bytes(path.read_bytes()[:20_000])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "forbidden pickle":
        path.write_bytes(_forbidden_pickle(tmp_path / "ran"))
    else:
        torch.save(torch.zeros(3), path)
    with pytest.raises(SystemExit) as exc:
        run(out, *ONE_BATCH, "--resume")
    message = _one_line_exit(exc)
    assert str(path) in message and "not a" in message and "weights_only" not in message
    assert not (tmp_path / "ran").exists()  # torch.load(weights_only=True) ran nothing
    RunFolder.open(out, {}, overwrite=True).close()  # the failed run released its lock


@pytest.mark.parametrize("corrupt", [False, True])
def test_missing_or_corrupt_data_is_a_one_line_error_and_leaves_no_folder(tmp_path, monkeypatch, corrupt):
    monkeypatch.delenv("PYRO_AVF_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    if corrupt:
        (data / "jsb_chorales.pickle").write_bytes(b"\x80\x02garbage")
    with pytest.raises(SystemExit) as exc:
        train.main([*TINY, *ONE_BATCH, "--data-dir", str(data), "--out-dir", str(tmp_path / "run")])
    message = _one_line_exit(exc)
    if corrupt:
        assert f"data file {data / 'jsb_chorales.pickle'} is corrupt" in message and "--download" in message
    else:
        assert "data file jsb_chorales.pickle not found" in message and str(data) in message
        assert f"pass --download to fetch it from {polyphonic.JSB_PICKLE_URL}" in message
    assert "download=True" not in message  # the hint of the Python API
    assert not (tmp_path / "run").exists()


def test_download_fetches_missing_data_into_the_cache(tmp_path, monkeypatch):
    """Offline: the public address is replaced by a file:// address of the shared copy."""
    monkeypatch.delenv("PYRO_AVF_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = DATA / "polyphonic" / "jsb_chorales.pickle"
    monkeypatch.setattr(polyphonic, "JSB_PICKLE_URL", source.as_uri())
    (tmp_path / "empty").mkdir()
    row = train.main([*TINY, *ONE_BATCH, "--data-dir", str(tmp_path / "empty"), "--download",
                      "--out-dir", str(tmp_path / "run")])  # fmt: skip
    cached = tmp_path / "cache" / "pyro_avf" / "polyphonic" / "jsb_chorales.pickle"
    assert cached.read_bytes() == source.read_bytes()
    assert row["epoch"] == 1 and (tmp_path / "run" / train.RESULTS).is_file()


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    actions = [a for a in train.build_parser()._actions if a.dest != "help"]
    starts = []
    for action in actions:
        starts.append(text.index(f"{action.option_strings[0]} ", starts[-1] + 1 if starts else 0))
    for action, start, end in zip(actions, starts, starts[1:] + [len(text)]):
        assert f"(default: {action.default})" in text[start:end], action.dest
    assert "--download" in text and "--overwrite" in text


def test_the_cpu_preset_sets_its_options_and_explicit_options_win():
    parser = train.build_parser()
    paper = train.parse_args(parser, [])
    assert (paper.preset, paper.update, paper.hidden_size, paper.lr, paper.model_size) == (
        "paper", "highway", 1024, 1e-4, None)  # fmt: skip
    cpu = train.parse_args(train.build_parser(), ["--preset", "cpu", "--lr", "0.01", "--iterations", "3"])
    for name, value in train.PRESETS["cpu"].items():
        assert getattr(cpu, name) == {"lr": 0.01, "iterations": 3}.get(name, value), name
    assert train.run_config(cpu) != train.run_config(train.parse_args(train.build_parser(), ["--preset", "cpu"]))
    with pytest.raises(SystemExit):
        train.parse_args(train.build_parser(), ["--preset", "fast"])


def test_min_lr_enters_the_run_config_only_when_set_and_is_checked(capsys):
    default = train.parse_args(train.build_parser(), [])
    floored = train.parse_args(train.build_parser(), ["--min-lr", "1e-6"])
    assert "min_lr" not in train.run_config(default)  # the folders of runs made before the option stay theirs
    assert train.run_config(floored)["min_lr"] == 1e-6
    parser = train.build_parser()
    with pytest.raises(SystemExit):
        train.check_args(parser, train.parse_args(parser, ["--lr", "1e-4", "--min-lr", "1e-3"]))
    assert "--min-lr must be a number in [0, --lr" in capsys.readouterr().err


def test_device_auto_runs_where_it_can_and_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    has_gpu = torch.cuda.is_available()
    assert train.resolve_device("auto").type == ("cuda" if has_gpu else "cpu")
    row = train.main([*TINY, "--epochs", "1", "--max-train-batches", "1", "--device", "auto", "--no-plots",
                      "--out-dir", str(tmp_path / "auto")])  # fmt: skip
    assert row["epoch"] == 1 and math.isfinite(row["test_free_energy_per_step"])
    if not has_gpu:
        with pytest.raises(SystemExit) as exc:
            train.main([*TINY, "--device", "cuda", "--out-dir", str(tmp_path / "cuda")])
        assert exc.value.code == 2 and "--device cuda: no CUDA device is available" in capsys.readouterr().err
        assert not (tmp_path / "cuda").exists()
