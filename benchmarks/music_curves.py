r"""Learning curves of the music runs: is a missed goal a matter of more training?

Reads the per-epoch histories (``results.csv`` of ``pyro_avf.train``, as kept in
``benchmarks/results/music_runs/srnn-<dataset>-<method>-seed<seed>[-<tag>].csv``) and draws, one panel per data
set, the validation free energy per step (our normalisation) against the epoch, one line per run, the selected
(best) epoch marked. It also returns one row per run:

- ``best``, ``best_epoch``: the lowest validation free energy and its epoch;
- ``last_quarter_gain``: how much the best validation fell over the last quarter of the run's epochs,
  :math:`\min_{e \le 3E/4} v_e - \min_{e \le E} v_e` (≥ 0; near 0: converged or over-fitting, larger: more
  epochs would still help).

Usage::

    python benchmarks/music_curves.py benchmarks/results/music_runs/*.csv --out benchmarks/results/music_curves.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

NAME = re.compile(r"srnn-(?P<dataset>[a-z_]+)-(?P<method>avf_k\d+|baseline)-seed(?P<seed>\d+)(?:-(?P<tag>[\w.]+))?$")
VALID = "epoch_valid_free_energy_per_step"


def summarise(path: Path) -> dict:
    """The run named by ``path`` and its curve's summary (see the module docstring)."""
    match = NAME.match(path.stem)
    if match is None:
        raise ValueError(f"{path.name}: expected srnn-<dataset>-<method>-seed<seed>[-<tag>].csv")
    history = pd.read_csv(path)
    if VALID not in history or history[VALID].isna().all():
        raise ValueError(f"{path}: no validation column {VALID!r}; train with --valid-every")
    curve = history.dropna(subset=[VALID])
    last = int(history["epoch"].max())
    best_row = curve.loc[curve[VALID].idxmin()]
    earlier = curve[curve["epoch"] <= 3 * last / 4]
    gain = float(earlier[VALID].min() - curve[VALID].min()) if len(earlier) else float("nan")
    return {**match.groupdict(), "seed": int(match["seed"]), "tag": match["tag"] or "", "epochs": last,
            "best": float(best_row[VALID]), "best_epoch": int(best_row["epoch"]), "last_quarter_gain": gain,
            "curve": curve[["epoch", VALID]].to_numpy()}  # fmt: skip


def plot(runs: List[dict], out: Path) -> None:
    """One panel per data set: validation free energy per step against epochs, the best epoch marked."""
    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in sorted((r for r in runs if r["dataset"] == dataset), key=lambda r: (r["method"], r["seed"], r["tag"])):
            label = f"{r['method']} seed {r['seed']}" + (f" ({r['tag']})" if r["tag"] else "")
            style = "--" if r["tag"] else "-"  # a tagged run (another schedule) dashed over its untagged twin
            (line,) = ax.plot(r["curve"][:, 0], r["curve"][:, 1], style, label=label, lw=1.2)
            ax.plot([r["best_epoch"]], [r["best"]], "o", color=line.get_color())
        values = [v for r in runs if r["dataset"] == dataset for v in r["curve"][:, 1]]
        low = min(values)
        ax.set_ylim(low - 0.05, low + 1.5)  # the early epochs are far above: keep the end legible
        ax.set(title=dataset, xlabel="epoch", ylabel="validation free energy (nats/step, ours)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("histories", nargs="+", type=Path, help="results.csv histories named srnn-<dataset>-...csv")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/music_curves.png"), help="the figure")
    args = p.parse_args(argv)
    runs = [summarise(path) for path in args.histories if path.suffix == ".csv"]
    plot(runs, args.out)
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "curve"} for r in runs])
    print(table.to_string(index=False, float_format="%.3f"))
    return table


if __name__ == "__main__":
    main()
