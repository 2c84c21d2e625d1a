"""The training API (pyro_avf.training.fit) on a small model written here, as a user would: each inference kind
lowers the validation free energy; an interrupted run resumes to exactly the uninterrupted one; early
stopping, the time budget, KL annealing, learning-rate schedules and gradient clipping do what they say; bad
models and data are refused with clear errors; without a terminal each epoch leaves one readable line."""

import math
import re

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn

import pyro_avf
from pyro_avf import training
from pyro_avf.checkpoints import read_checkpoint
from pyro_avf.evaluation import FreeEnergy, evaluate


class TinySSM(nn.Module):
    """A 2-d linear-Gaussian state-space model with learnable dynamics and noise scales, and its own filter (a
    linear map of z_{t-1} and x_t) for inference="baseline". The observation scale starts far too large."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(0.5 * torch.eye(2))
        self.log_q = nn.Parameter(torch.zeros(2))
        self.log_r = nn.Parameter(torch.full((2,), 1.0))
        self.filter = nn.Linear(4, 4)

    @pyro_avf.filtering_step
    def step(self, t, z_prev, x_t, mask_t):
        with poutine.mask(mask=mask_t):
            z = pyro.sample(f"z_{t}", dist.Normal(z_prev @ self.A.T, self.log_q.exp()).to_event(1))
            pyro.sample(f"x_{t}", dist.Normal(z, self.log_r.exp()).to_event(1), obs=x_t)
        return z

    def model(self, xs, mask):
        pyro.module("tiny_ssm", self)
        z = xs.new_zeros(xs.size(0), 2)
        with pyro.plate("sequences", xs.size(0)):
            for t in pyro.markov(range(xs.size(1))):
                z = self.step(t, z, xs[:, t], mask[:, t])

    def guide(self, xs, mask):
        pyro.module("tiny_ssm", self)
        z = xs.new_zeros(xs.size(0), 2)
        with pyro.plate("sequences", xs.size(0)):
            for t in pyro.markov(range(xs.size(1))):
                loc, log_scale = self.filter(torch.cat([z, xs[:, t]], -1)).chunk(2, -1)
                with poutine.mask(mask=mask[:, t]):
                    z = pyro.sample(f"z_{t}", dist.Normal(loc, log_scale.clamp(-5, 2).exp()).to_event(1))


def simulate(n, seed, lengths=(6, 12)):
    """Variable-length sequences of the true model (A = 0.9 I, q = r = 0.5)."""
    g = torch.Generator().manual_seed(seed)
    songs = []
    for _ in range(n):
        z, xs = torch.zeros(2), []
        for _ in range(int(torch.randint(lengths[0], lengths[1] + 1, (), generator=g))):
            z = 0.9 * z + 0.5 * torch.randn(2, generator=g)
            xs.append(z + 0.5 * torch.randn(2, generator=g))
        songs.append(torch.stack(xs))
    return songs


TRAIN, VALID = simulate(48, 1), simulate(12, 2)
SMALL = dict(batch_size=16, lr=0.05, guide_kwargs={"num_iterations": 2, "hidden_size": 16}, progress=False)


def fresh(seed=0):
    pyro.set_rng_seed(seed)
    return TinySSM()


@pytest.mark.parametrize(
    "options",
    [
        dict(inference="avf"),
        dict(inference="em", guide_kwargs={"num_iterations": 5, "lr": 0.1}),
        dict(inference="baseline", elbo=TraceMeanField_ELBO()),
    ],
    ids=["avf", "em", "baseline"],
)
def test_each_inference_lowers_the_validation_free_energy(options):
    result = training.fit(fresh(), TRAIN, valid_data=VALID, epochs=6, **{**SMALL, **options})
    valid = result.history["valid_free_energy_per_step"]
    assert len(valid) == 6 and valid.notna().all()
    assert valid.iloc[-1] < valid.iloc[0] - 0.3, valid.tolist()  # the observation scale learns from e^1 towards 0.5
    assert result.model.log_r.detach().max() < 0.9
    assert result.best_epoch == int(valid.idxmin()) + 1
    # the result's model holds the best parameters: evaluate gives that validation score again
    assert result.evaluate(VALID).per_step == pytest.approx(valid.min(), rel=1e-5)
    assert evaluate(result.model, result.guide, VALID).steps == sum(len(s) for s in VALID)
    assert isinstance(result.guide, pyro_avf.IterativeGuide) == (options["inference"] != "baseline")


def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_one(tmp_path):
    options = dict(SMALL, valid_data=VALID, test_data=VALID[:4], epochs=3, batch_size=8, kl_anneal_epochs=2)

    class Kill(Exception):
        pass

    def kill_after(n):
        def on_batch(done, loss):
            if done >= n:
                raise Kill

        return on_batch

    whole = training.fit(fresh(), TRAIN, out_dir=tmp_path / "whole", **options)
    with pytest.raises(Kill):  # in epoch 2, after the checkpoint of epoch 1 (6 batches per epoch)
        training.fit(fresh(), TRAIN, out_dir=tmp_path / "cut", on_batch=kill_after(9), **options)
    assert read_checkpoint(tmp_path / "cut" / training.CHECKPOINT)["epoch"] == 1
    resumed = training.fit(fresh(seed=123), TRAIN, out_dir=tmp_path / "cut", resume=True, **options)

    columns = [c for c in whole.history.columns if c not in ("wall_time_s", "cpu_time_s")]
    pd.testing.assert_frame_equal(whole.history[columns], resumed.history[columns])
    assert len(whole.history) == 3 and whole.history["test_free_energy_per_step"].notna().all()
    last = [read_checkpoint(tmp_path / d / training.CHECKPOINT) for d in ("whole", "cut")]
    best = [r.trainer.snapshot()["net"] for r in (whole, resumed)]  # the models hold the best parameters
    for a, b in [(last[0]["net"], last[1]["net"]), (best[0], best[1])]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert last[0]["optimizer"]["state"].keys() == last[1]["optimizer"]["state"].keys()
    assert pd.read_csv(tmp_path / "cut" / training.RESULTS)["epoch"].tolist() == [1, 2, 3]


def test_early_stopping_stops_after_patience_validations_without_improvement(tmp_path, monkeypatch):
    curve = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 2.0, 1.0])  # validation free energy per step, epoch by epoch
    monkeypatch.setattr(training, "score_batches",
                        lambda *args, **kwargs: FreeEnergy.from_sums(10 * next(curve), 10, 0.0, 1))  # fmt: skip
    result = training.fit(fresh(), TRAIN, valid_data=VALID, epochs=10, patience=3, out_dir=tmp_path, plots=False,
                          **SMALL)  # fmt: skip
    assert result.stop_reason == "patience"
    assert result.history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]  # epochs 4, 5, 6 do not beat epoch 3
    assert result.history["best_epoch"].tolist() == [1, 2, 3, 3, 3, 3]
    assert result.best_epoch == 3 and read_checkpoint(tmp_path / training.BEST)["epoch"] == 3
    best, last = result.best_state["net"], read_checkpoint(tmp_path / training.CHECKPOINT)["net"]
    assert read_checkpoint(tmp_path / training.CHECKPOINT)["epoch"] == 6
    now = result.trainer.snapshot()["net"]
    assert all(torch.equal(now[k], best[k]) for k in best)  # the model holds the parameters of epoch 3
    assert not all(torch.equal(last[k], best[k]) for k in best)


def test_the_learning_rate_drops_after_validations_without_improvement_and_resumes_dropped(tmp_path, monkeypatch):
    scores = [5.0, 4.0, 4.5, 4.2, 3.0, 3.5, 3.6, 3.7, 3.8]  # no improvement at epochs 3-4 and 6-9
    curve = iter(scores)
    monkeypatch.setattr(training, "score_batches",
                        lambda *args, **kwargs: FreeEnergy.from_sums(10 * next(curve), 10, 0.0, 1))  # fmt: skip
    options = dict(valid_data=VALID, lr_drop_patience=2, lr_drop_factor=0.5, plots=False, **SMALL)
    result = training.fit(fresh(), TRAIN, epochs=7, out_dir=tmp_path, **options)
    lr = result.history["lr"].tolist()  # the rate each epoch trained with
    base = lr[0]
    assert lr == pytest.approx([base, base, base, base, base / 2, base / 2, base / 2])
    assert result.trainer.lr == pytest.approx(base / 4)  # dropped again after epoch 7 (stale 2)
    per_epoch = result.history["updates"].iloc[0]
    assert per_epoch >= 1 and result.history["updates"].tolist() == [per_epoch * e for e in range(1, 8)]
    assert result.history["cpu_time_s"].is_monotonic_increasing
    resumed = training.fit(fresh(), TRAIN, epochs=9, out_dir=tmp_path, resume=True, **options)
    assert resumed.history["lr"].tolist()[7:] == pytest.approx([base / 4, base / 4])
    with pytest.raises(ValueError, match="lr_drop_factor"):
        training.fit(fresh(), TRAIN, lr_drop_factor=1.5, **SMALL)


def test_min_lr_is_the_floor_of_the_learning_rate_under_drops_and_schedule(monkeypatch):
    curve = iter([5.0, 5.5, 5.5, 5.5, 5.5])  # never improves after the first validation
    monkeypatch.setattr(training, "score_batches",
                        lambda *args, **kwargs: FreeEnergy.from_sums(10 * next(curve), 10, 0.0, 1))  # fmt: skip
    options = {**SMALL, "lr": 1e-2, "plots": False}
    result = training.fit(fresh(), TRAIN, epochs=5, valid_data=VALID, lr_drop_patience=1, lr_drop_factor=0.1,
                          min_lr=3e-4, **options)  # fmt: skip
    assert result.history["lr"].tolist() == pytest.approx([1e-2, 1e-2, 1e-3, 3e-4, 3e-4])
    assert result.trainer.lr == pytest.approx(3e-4)
    decayed = training.fit(fresh(), TRAIN, epochs=4, lr_schedule=lambda epoch: 0.1**epoch, min_lr=3e-4, **options)
    assert decayed.history["lr"].tolist() == pytest.approx([1e-2, 1e-3, 3e-4, 3e-4])
    with pytest.raises(ValueError, match="min_lr 1.0 is above the initial learning rate"):
        training.fit(fresh(), TRAIN, min_lr=1.0, **SMALL)
    with pytest.raises(ValueError, match="min_lr must be a non-negative number"):
        training.fit(fresh(), TRAIN, min_lr=-1.0, **SMALL)


def test_the_time_budget_ends_the_run_after_the_batch_under_way():
    batches = []
    result = training.fit(fresh(), TRAIN, epochs=5, max_minutes=1e-6, on_batch=lambda n, loss: batches.append(n),
                          device="cpu", **SMALL)  # fmt: skip
    assert result.stop_reason == "max_minutes" and batches == [1]
    assert result.history["epoch"].tolist() == [1]


def test_kl_annealing_sets_the_weight_of_every_epoch():
    class RecordingELBO(pyro_avf.AmortizedFilteringELBO):
        seen = []

        def differentiable_loss(self, *args, **kwargs):
            self.seen.append(self.kl_weight)
            return super().differentiable_loss(*args, **kwargs)

    result = training.fit(fresh(), TRAIN, epochs=5, kl_anneal_epochs=4, batches_per_epoch=1, elbo=RecordingELBO(),
                          **SMALL)  # fmt: skip
    assert result.history["kl_weight"].tolist() == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert RecordingELBO.seen[1:] == [0.25, 0.5, 0.75, 1.0, 1.0]  # after the pass that builds the networks
    assert training.kl_weight(0, 0) == 1.0 and training.kl_weight(0, 50) == 1 / 50
    assert [training.kl_weight(e, 50, power=2) for e in (0, 24, 49, 80)] == pytest.approx([1 / 2500, 0.25, 1, 1])
    quadratic = training.fit(fresh(), TRAIN, epochs=3, kl_anneal_epochs=2, kl_anneal_power=2.0, batches_per_epoch=1,
                             **SMALL)  # fmt: skip
    assert quadratic.history["kl_weight"].tolist() == [0.25, 1.0, 1.0]
    with pytest.raises(ValueError, match="kl_anneal_power"):
        training.fit(fresh(), TRAIN, kl_anneal_power=0, **SMALL)


def test_learning_rate_schedules_and_gradient_clipping():
    halving = training.fit(fresh(), TRAIN, epochs=3, batches_per_epoch=1, lr_schedule=lambda e: 0.5**e, **SMALL)
    assert halving.history["lr"].tolist() == pytest.approx([0.05, 0.025, 0.0125])
    decay = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.02}, "gamma": 0.1})
    scheduled = training.fit(fresh(), TRAIN, epochs=2, batches_per_epoch=1, optimizer=decay, **SMALL)
    assert scheduled.history["lr"].tolist() == pytest.approx([0.02, 0.002])
    with pytest.raises(ValueError, match="not both"):
        training.fit(fresh(), TRAIN, optimizer=decay, lr_schedule=lambda e: 1.0, **SMALL)

    model = fresh()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    clipped = pyro.optim.SGD({"lr": 1.0}, clip_args={"clip_norm": 1e-3})  # each tensor's gradient norm <= 1e-3
    training.fit(model, TRAIN, inference="baseline", epochs=1, batches_per_epoch=1, optimizer=clipped,
                 **{**SMALL, "guide_kwargs": None})  # fmt: skip
    moved = {k: (p.detach() - before[k]).norm().item() for k, p in model.named_parameters()}
    assert max(moved.values()) <= 1e-3 + 1e-7 and min(moved.values()) > 0, moved


def test_a_pyro_function_with_pyro_params_trains_on_one_tensor_of_sequences():
    """No nn.Module, no mask: model(xs) on equal-length sequences; its pyro.param is trained and saved."""

    @pyro_avf.filtering_step
    def step(t, z_prev, x_t):
        z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z_prev, 0.5).to_event(1))
        pyro.sample(f"x_{t}", dist.Normal(z, pyro.param("r", torch.tensor(3.0), constraint=dist.constraints.positive))
                    .to_event(1), obs=x_t)  # fmt: skip
        return z

    def model(xs):
        z = xs.new_zeros(xs.size(0), 2)
        with pyro.plate("sequences", xs.size(0)):
            for t in pyro.markov(range(xs.size(1))):
                z = step(t, z, xs[:, t])

    xs = torch.stack([s[:6] for s in TRAIN])
    result = training.fit(model, xs, epochs=4, crop_length=4, valid_data=xs[:8], **SMALL)
    assert list(result.trainer.store_params) == ["r"]
    assert pyro.param("r").item() < 2.0  # from 3 towards the true 0.5
    assert result.history["valid_free_energy_per_step"].is_monotonic_decreasing
    assert set(result.best_state["params"]) == {"r"}


def test_bad_models_and_data_are_refused_with_clear_errors():
    class NoModel(nn.Module):
        def guide(self, xs, mask):
            pass

    with pytest.raises(TypeError, match=r"NoModel is not a sequence model: it needs a method model\(xs, mask\)"):
        training.fit(NoModel(), TRAIN, **SMALL)
    nan = [s.clone() for s in TRAIN[:3]]
    nan[1][4, 0] = math.nan
    with pytest.raises(ValueError, match=r"train_data\[1\] holds NaN or infinite values \(first at step 4\)"):
        training.fit(fresh(), nan, **SMALL)
    with pytest.raises(ValueError, match=r"valid_data\[0\] is empty"):
        training.fit(fresh(), TRAIN, valid_data=[torch.zeros(0, 2)], **SMALL)
    with pytest.raises(ValueError, match="steps of shape"):
        training.fit(fresh(), [torch.zeros(3, 2), torch.zeros(3, 5)], **SMALL)
    with pytest.raises(TypeError, match="train_data must be a list of"):
        training.fit(fresh(), "songs.npz", **SMALL)

    def function_model(xs, mask):
        pass

    with pytest.raises(ValueError, match="has no guide"):
        training.fit(function_model, TRAIN, inference="baseline", **SMALL)
    with pytest.raises(ValueError, match="inference must be one of"):
        training.fit(fresh(), TRAIN, inference="autonormal", **SMALL)
    with pytest.raises(ValueError, match="inference='em' is non-amortized"):
        training.fit(fresh(), TRAIN, inference="em", **{**SMALL, "guide_kwargs": {"update": "highway"}})
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        training.fit(fresh(), TRAIN, epochs=0, **SMALL)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        training.fit(fresh(), TRAIN, out_dir="/nonexistent/run", resume=True, **SMALL)


def test_each_epoch_leaves_one_readable_line_when_not_a_terminal(capsys):
    training.fit(fresh(), TRAIN, valid_data=VALID, epochs=2, batches_per_epoch=1, **{**SMALL, "progress": True})
    err = capsys.readouterr().err
    lines = err.splitlines()
    pattern = (r"epoch {}/2: train \d+\.\d{{4}} nats/step, valid \d+\.\d{{4}} \(best \d+\.\d{{4}} at epoch \d\); "
               r"β 1, lr 0\.05, \d+\.\d s")  # fmt: skip
    assert [bool(re.fullmatch(pattern.format(e), line)) for e, line in zip((1, 2), lines)] == [True, True], lines
    assert len(lines) == 2 and "\r" not in err  # no progress bar drawn into a file
    training.fit(fresh(), TRAIN, epochs=1, batches_per_epoch=1, **SMALL)  # progress=False: silent
    assert capsys.readouterr().err == ""
