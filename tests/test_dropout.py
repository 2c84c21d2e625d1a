"""SRNN's dropout on d_t: on in training mode with one mask per pass (every AVF re-run of a step sees the same
model), off while evaluate() scores, and the command line's --dropout."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

import pyro_avf
from pyro_avf import train
from pyro_avf.evaluation import evaluate
from pyro_avf.models.srnn import SRNN


def small_srnn(dropout: float) -> SRNN:
    torch.manual_seed(0)
    return SRNN.music(z_dim=3, d_dim=16, a_dim=8, hidden_dim=8, dropout=dropout)


def songs(n=3, length=7):
    torch.manual_seed(1)
    return [torch.bernoulli(torch.full((length, 88), 0.1)) for _ in range(n)]


def test_dropout_is_off_while_evaluate_scores_and_the_training_flag_comes_back():
    pyro.clear_param_store()
    plain, dropped = small_srnn(0.0), small_srnn(0.5)
    dropped.load_state_dict(plain.state_dict())
    assert dropped.training
    scores = [evaluate(m, m.guide, songs(), seed=3).per_step for m in (plain, dropped)]
    assert scores[0] == scores[1]  # eval mode: the same weights score the same, to the last bit
    assert dropped.training and dropped.generative.dropout.training


def test_dropout_changes_the_training_loss_and_a_zero_rate_does_not():
    pyro.clear_param_store()
    xs = torch.stack(songs())
    losses = {}
    for rate in (0.0, 0.5):
        srnn = small_srnn(rate)
        pyro.set_rng_seed(4)
        losses[rate] = TraceMeanField_ELBO().loss(srnn.model, srnn.guide, xs)
        srnn.eval()
        pyro.set_rng_seed(4)
        losses[f"{rate} eval"] = TraceMeanField_ELBO().loss(srnn.model, srnn.guide, xs)
    assert losses["0.0 eval"] == losses[0.0] == losses["0.5 eval"]
    assert abs(losses[0.5] - losses[0.0]) > 1.0


def test_every_inference_rerun_of_a_step_sees_the_pass_mask():
    """The step's d_t is computed once per pass (in model()), so the re-runs and the final run of a step read
    the same dropped d_t."""
    pyro.clear_param_store()
    srnn = small_srnn(0.5)
    seen = {}
    step = SRNN.step.__wrapped__ if hasattr(SRNN.step, "__wrapped__") else None
    assert step is not None

    def spy(self, t, z_prev, d_t, x_t, mask_t=None):
        seen.setdefault(t, []).append(d_t.detach().clone())
        return step(self, t, z_prev, d_t, x_t, mask_t)

    srnn.step = pyro_avf.filtering_step(spy.__get__(srnn))
    guide = pyro_avf.IterativeGuide(srnn.model, num_iterations=3, hidden_size=8)
    xs = torch.stack(songs())
    guide(xs)
    assert sorted(seen) == list(range(1, 8))
    for runs in seen.values():
        assert len(runs) == 1 + 3 * guide.num_samples  # the final run and every inference re-run
        assert all(torch.equal(d, runs[0]) for d in runs)
        assert 0.3 < (runs[0] == 0).float().mean() < 0.7  # dropped at rate 0.5, in training mode


@pytest.mark.parametrize("options, message", [(["--dropout", "1.0"], "--dropout must be in [0, 1)"),
                                              (["--model", "vrnn", "--dropout", "0.2"], "srnn only")])  # fmt: skip
def test_cli_dropout_is_checked_and_enters_the_run_config_only_when_set(options, message, capsys):
    parser = train.build_parser()
    with pytest.raises(SystemExit):
        train.check_args(parser, train.parse_args(parser, options))
    assert message in capsys.readouterr().err
    default = train.parse_args(parser, [])
    assert "dropout" not in train.run_config(default)  # the folders of runs made before the option stay theirs
    args = train.parse_args(parser, ["--dropout", "0.25"])
    assert train.run_config(args)["dropout"] == 0.25
    assert train.build_model(args).generative.dropout.p == 0.25


def test_srnn_refuses_a_dropout_rate_outside_zero_one():
    with pytest.raises(ValueError, match="dropout must be in"):
        SRNN.music(dropout=1.0)
    with poutine.block():
        assert SRNN.music(z_dim=2, d_dim=4, a_dim=4, hidden_dim=4).generative.dropout.p == 0.0
