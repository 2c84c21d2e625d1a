"""Iterative amortized inference vs a direct encoder for a VAE on MNIST digits, under equal wall-clock budgets.

Methods (each trains a fresh :class:`~pyro_avf.models.vae.VAE` with Adam for ``--minutes`` of wall-clock time,
one :class:`pyro_avf.trainer.Trainer` step per shuffled mini-batch; the loop is this script's own because
:func:`pyro_avf.training.fit` counts free energies per time step of sequences, and these are images):

* ``iterative-gradient``: :class:`~pyro_avf.IterativeGuide`, gradient encoding, Bernoulli VAE on binarised digits,
  :class:`~pyro_avf.AmortizedFilteringELBO`;
* ``direct-bernoulli``: :class:`~pyro_avf.models.vae.DirectEncoder` on the same model, ``pyro.infer.Trace_ELBO``;
* ``iterative-error``: IterativeGuide, error encoding, Gaussian VAE on dequantised intensities
  :math:`x = (\\text{intensity} + u) / 256`, :math:`u \\sim U(0, 1)` (drawn once per image);
* ``direct-gaussian``: DirectEncoder on that Gaussian model, Trace_ELBO.

Each direct encoder has a hidden size that gives it about as many parameters as the update network it is
compared with. Digits are the MNIST test set split into disjoint train and test pools (``split_digits``).

Scores on the test pool, in nats per image (lower is better):

* amortized free energy :math:`\\mathcal{F}(x; \\lambda_\\phi(x))` (:meth:`VAE.free_energy`, ``--eval-samples``
  draws, analytic KL);
* refined free energy: :math:`\\lambda` optimised per image from :math:`\\lambda_\\phi(x)` by ``--refine-steps``
  Adam steps on :math:`\\mathcal{F}` (decoder fixed);
* amortization gap = amortized - refined.

Example::

    python benchmarks/static_vae.py --minutes 6 --threads 1 --out /tmp/vae_results.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pyro
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_loaders.mnist import load_mnist_test, mnist_tensor_dataset, split_digits  # noqa: E402
from pyro_avf import IterativeGuide  # noqa: E402
from pyro_avf.models.vae import VAE, DirectEncoder, encoder_hidden_for, num_parameters  # noqa: E402
from pyro_avf.trainer import Trainer  # noqa: E402
from pyro_avf.updates import UpdateNetwork  # noqa: E402

METHODS = {  # name -> (likelihood, encoding or None for the direct encoder)
    "iterative-gradient": ("bernoulli", "gradient"),
    "direct-bernoulli": ("bernoulli", None),
    "iterative-error": ("gaussian", "error"),
    "direct-gaussian": ("gaussian", None),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=1.0, help="wall-clock training budget per method")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--z-dim", type=int, default=32)
    p.add_argument("--decoder-hidden", type=int, default=256)
    p.add_argument("--update-hidden", type=int, default=256, help="hidden units of the iterative update network")
    p.add_argument("--iterations", type=int, default=5, help="K, inference iterations of the iterative guide")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=10, help="samples per free-energy estimate at test")
    p.add_argument("--refine-steps", type=int, default=200)
    p.add_argument("--refine-lr", type=float, default=1e-2)
    p.add_argument("--test-batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding mnist/")
    p.add_argument("--out", type=Path, default=Path("/tmp/vae_results.md"))
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    return args


def load_digits(data: Path, likelihood: str, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flattened (N, 784) train and test digits: statically binarised (Bernoulli) or dequantised (Gaussian)."""
    images, labels = load_mnist_test(data)
    train_idx, test_idx = split_digits(seed=seed)
    if likelihood == "bernoulli":
        return tuple(
            mnist_tensor_dataset(images, labels, idx, "sample", seed).tensors[0] for idx in (train_idx, test_idx)
        )
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed))
    x = ((images.float() + noise) / 256).reshape(len(images), -1)
    return x[train_idx], x[test_idx]


def make_trainer(vae: VAE, encoding, args) -> Tuple[Trainer, int]:
    """(trainer, guide parameter count): the direct encoder with ``Trace_ELBO`` or an ``IterativeGuide`` with
    ``AmortizedFilteringELBO``, Adam at ``--lr``. Direct encoders get the parameter count of the matching
    update network (gradient encoding for the Bernoulli model, error encoding for the Gaussian one)."""
    error_dim = vae.x_dim if vae.likelihood == "gaussian" else 0
    ref_encoding = "error" if vae.likelihood == "gaussian" else "gradient"
    ref = UpdateNetwork(args.z_dim, "highway", ref_encoding, error_dim, hidden=args.update_hidden)
    if encoding is None:
        encoder = DirectEncoder(args.z_dim, encoder_hidden_for(num_parameters(ref), args.z_dim), vae.x_dim)
        return Trainer(vae, inference="baseline", guide=encoder, lr=args.lr, clip_norm=None), num_parameters(encoder)
    guide_kwargs = dict(num_iterations=args.iterations, encoding=encoding, encode_observation=False,
                        hidden_size=args.update_hidden)
    return Trainer(vae, guide_kwargs=guide_kwargs, lr=args.lr, clip_norm=None), num_parameters(ref)


def train(trainer: Trainer, x: torch.Tensor, args, desc: str) -> Dict[str, float]:
    """Optimiser steps (SVI steps) on shuffled mini-batches until ``args.minutes`` of wall-clock time have passed.
    Also records the process CPU time used (on a shared machine the same wall-clock budget may buy different
    amounts of compute)."""
    budget = 60 * args.minutes
    steps, losses, start, cpu_start = 0, [], time.perf_counter(), time.process_time()
    bar = tqdm(total=round(budget), desc=desc, unit="s", leave=False, mininterval=2.0)
    while True:
        for idx in torch.randperm(len(x)).split(args.batch_size):
            losses.append(trainer.step(x[idx]) / len(idx))
            steps += 1
            elapsed = time.perf_counter() - start
            bar.set_postfix(step=steps, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.1f}", refresh=False)
            bar.update(min(int(elapsed), bar.total) - bar.n)
            if elapsed >= budget:
                bar.close()
                tail = losses[-200:]
                return {
                    "steps": steps,
                    "epochs": steps * args.batch_size / len(x),
                    "train_loss": sum(tail) / len(tail),
                    "cpu_s": time.process_time() - cpu_start,
                }


def amortized_posterior(vae: VAE, guide, elbo, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loc, scale) of the guide's q(z | x), and the per-iteration free energy summed over the batch (iterative
    guide: K + 1 values from ``elbo.diagnostics``; direct encoder: empty)."""
    if isinstance(guide, IterativeGuide):
        elbo.loss(vae.model, guide, x)  # one guide pass; inference needs autograd
        loc, log_scale = guide.get_traces()[0].nodes["z"]["infer"]["avf_lambda"]
        per_iteration = elbo.diagnostics["free_energy"].sum((0, 1))
        return loc.detach(), log_scale.detach().exp(), per_iteration
    with torch.no_grad():
        loc, scale = guide.posterior(x)
    return loc, scale, torch.zeros(0)


def refine(
    vae: VAE, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, args
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image optimisation of λ = (loc, log scale) from the amortized estimate: Adam on F(x; λ), decoder fixed."""
    lam = [loc.clone().requires_grad_(), scale.log().requires_grad_()]
    opt = torch.optim.Adam(lam, lr=args.refine_lr)
    for _ in range(args.refine_steps):
        loss = vae.free_energy(x, lam[0], lam[1].exp()).sum()
        lam[0].grad, lam[1].grad = torch.autograd.grad(loss, lam)
        opt.step()
    return lam[0].detach(), lam[1].detach().exp()


def evaluate(vae: VAE, guide, elbo, x_test: torch.Tensor, args, desc: str) -> Dict[str, object]:
    """Amortized and refined test free energies (nats per image) and the per-iteration free energy."""
    amortized = refined = 0.0
    per_iteration = torch.zeros(0)
    for x in tqdm(x_test.split(args.test_batch_size), desc=desc, leave=False):
        loc, scale, fe_k = amortized_posterior(vae, guide, elbo, x)
        per_iteration = fe_k if per_iteration.numel() == 0 else per_iteration + fe_k
        r_loc, r_scale = refine(vae, x, loc, scale, args)
        with torch.no_grad():
            amortized += vae.free_energy(x, loc, scale, args.eval_samples).sum().item()
            refined += vae.free_energy(x, r_loc, r_scale, args.eval_samples).sum().item()
    n = len(x_test)
    return {"amortized": amortized / n, "refined": refined / n, "per_iteration": (per_iteration / n).tolist()}


def run_method(name: str, data: Dict[str, Tuple[torch.Tensor, torch.Tensor]], args) -> Dict[str, object]:
    likelihood, encoding = METHODS[name]
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(args.z_dim, args.decoder_hidden, likelihood)
    trainer, guide_params = make_trainer(vae, encoding, args)
    guide, loss = trainer.guide, trainer.net.objective.elbo
    x_train, x_test = data[likelihood]
    result = {"method": name, "likelihood": likelihood, "guide_params": guide_params}
    result.update(train(trainer, x_train, args, f"train {name}"))
    if isinstance(guide, IterativeGuide):  # the update networks are built on the first pass
        result["guide_params"] = num_parameters(guide.update_nets)
    result.update(evaluate(vae, guide, loss, x_test, args, f"test {name}"))
    result["gap"] = result["amortized"] - result["refined"]
    tqdm.write(f"{name}: {result}")
    return result


def markdown(results: List[Dict[str, object]], args, seconds: float) -> str:
    """The results section: setup, main table, and per-iteration free energies of the iterative guides."""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor() or "unknown",
    )
    lines = [
        "## Static model: iterative amortized inference for a VAE on MNIST (issue 2)",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {os.cpu_count()} cores (nproc), {cpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); pyro {pyro.__version__}  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}; total run time {seconds / 60:.1f} min  ",
        f"Setup: MNIST test set split 8,000 train / 2,000 test digits (split_digits seed {args.seed}); VAE z_dim "
        f"{args.z_dim}, decoder 2x{args.decoder_hidden} ReLU; Adam lr {args.lr}, batch {args.batch_size}, "
        f"{args.minutes:g} min wall-clock per method; iterative guides K = {args.iterations} highway updates "
        f"({args.update_hidden} hidden). Test free energy = negative ELBO in nats per image ({args.eval_samples} "
        f"samples, analytic KL); refined = {args.refine_steps} Adam steps (lr {args.refine_lr}) on each image's "
        "posterior from the amortized one; gap = amortized - refined. Bernoulli rows: statically binarised digits; "
        "Gaussian rows: dequantised intensities (x + U(0,1))/256, a density on [0,1]^784, so negative values. "
        "Train loss: mean over the last 200 SVI steps (nats per image). CPU s: process CPU time used for training "
        "within the wall-clock budget (one thread; the machine is shared).",
        "",
        "| method | likelihood | guide params | SVI steps | epochs | CPU s | train loss | test F amortized | "
        "test F refined | amortization gap |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['likelihood']} | {r['guide_params']:,} | {r['steps']:,} | {r['epochs']:.1f} | "
            f"{r['cpu_s']:.0f} | {r['train_loss']:.2f} | {r['amortized']:.2f} | {r['refined']:.2f} | {r['gap']:.2f} |"
        )
    iterative = [r for r in results if r["per_iteration"]]
    if iterative:
        k = len(iterative[0]["per_iteration"])
        lines += [
            "",
            "Test free energy (nats per image, one sample) across inference iterations of the iterative guides "
            "(iteration 0 = the prior):",
            "",
            "| method | " + " | ".join(f"k={i}" for i in range(k)) + " |",
            "| --- |" + " ---: |" * k,
        ]
        for r in iterative:
            lines.append(f"| {r['method']} | " + " | ".join(f"{v:.2f}" for v in r["per_iteration"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    likelihoods = {METHODS[m][0] for m in args.methods}
    data = {lik: load_digits(args.data, lik, args.seed) for lik in likelihoods}
    results = [run_method(name, data, args) for name in args.methods]
    text = markdown(results, args, time.perf_counter() - start)
    print(text)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
