"""How much of the gap between the filtering bound and the log-likelihood a particle filter closes on music.

Loads a trained run folder of ``python -m pyro_avf.train --model srnn --inference avf`` (its ``config.json`` and
the best parameters ``best.pt``), and scores the test songs with :func:`pyro_avf.smc.smc_log_likelihood`, the
trained guide as proposal, for each ``--particles`` N: :math:`-\\sum_n \\log \\hat p(x^n) / \\sum_n T_n` in nats per
step (our normalisation), beside the filtering free energy of the same model and guide (the N = 1 bound's
expectation, with the analytic KL). A lower number is a tighter bound on :math:`-\\log p(x)/T`.

Usage::

    python benchmarks/smc_music.py runs/music/srnn-jsb_chorales-avf_k1-seed0 --particles 1 16 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd
import pyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyro_avf import experiments, train  # noqa: E402
from pyro_avf.checkpoints import read_checkpoint  # noqa: E402
from pyro_avf.evaluation import evaluate  # noqa: E402
from pyro_avf.online import as_stream  # noqa: E402
from pyro_avf.sequences import as_sequences  # noqa: E402
from pyro_avf.smc import smc_log_likelihood  # noqa: E402
from pyro_avf.trainer import Trainer  # noqa: E402


def load_run(folder: Path, data_dir: Optional[str]):
    """The run's model and trained guide (best parameters) and its arguments."""
    args = train.build_parser().parse_args([])
    for key, value in json.loads((folder / "config.json").read_text()).items():
        setattr(args, key, value)
    args.data_dir, args.download = data_dir, False
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = experiments.build_model(args)
    trainer = Trainer(model, **train.inference_options(args))
    songs = experiments.load_songs(args, "train")[:2]
    xs, mask = as_sequences(songs, "songs").batches(2)[0]
    trainer.build(xs, mask)
    trainer.restore(read_checkpoint(folder / "best.pt"))
    return model, trainer.guide, args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("run", type=Path, help="a run folder with config.json and best.pt")
    p.add_argument("--particles", nargs="+", type=int, default=[1, 16, 128])
    p.add_argument("--max-songs", type=int, default=None, help="the first N test songs only")
    p.add_argument("--batch-size", type=int, default=16, help="songs per SMC batch")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="CSV of the rows")
    args = p.parse_args(argv)
    missing = [name for name in ("config.json", "best.pt") if not (args.run / name).is_file()]
    if missing:
        p.error(f"{args.run} is not a finished run folder with validation: it has no {' or '.join(missing)} "
                "(train with --valid-every)")
    model, guide, run_args = load_run(args.run, args.data_dir)
    songs = experiments.load_songs(run_args, "test")[: args.max_songs]
    rows = []
    start = time.process_time()
    bound = evaluate(model, guide, songs, batch_size=args.batch_size, stream=as_stream, seed=args.seed)
    rows.append({"estimate": "filtering free energy", "particles": 1, "nats_per_step": bound.per_step,
                 "cpu_s": time.process_time() - start})  # fmt: skip
    print(f"filtering free energy: {bound.per_step:.4f} nats/step ({bound.steps} steps, {len(songs)} songs)")
    for n in args.particles:
        start, total, steps = time.process_time(), 0.0, 0
        for xs, mask in as_sequences(songs, "songs").batches(args.batch_size):
            est = smc_log_likelihood(model, guide, xs, mask, num_particles=n, seed=args.seed)
            total, steps = total + est.log_marginal.sum().item(), steps + int(mask.sum())
        rows.append({"estimate": "SMC, AVF proposal", "particles": n, "nats_per_step": -total / steps,
                     "cpu_s": time.process_time() - start})  # fmt: skip
        print(f"SMC N = {n}: {-total / steps:.4f} nats/step ({rows[-1]['cpu_s']:.0f} CPU s)", flush=True)
    if args.out is not None:
        pd.DataFrame(rows).to_csv(args.out, index=False, float_format="%.4f")
    return rows


if __name__ == "__main__":
    main()
