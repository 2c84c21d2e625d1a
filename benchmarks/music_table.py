r"""The music table at a glance: for each data set and method, the run chosen on the validation songs.

Reads the run histories kept in ``benchmarks/results/music_runs`` (``results.csv`` of ``pyro_avf.train``,
renamed ``srnn-<dataset>-<method>-seed<seed>[-<tag>].csv``, each beside its ``.config.json``), and for every
(data set, method, seed) selects, among the runs that were scored on the test songs, the one with the lowest
validation free energy per step (our normalisation): model selection on validation only, over the same grid
of settings for every method that was run with them (SRNN size, dropout, crop length, epochs, the
patience of the learning-rate drop). Its test score
is printed in both normalisations beside the AVF paper's figure (Table 3, the JSB 5-iteration figure), with
the gap in percent of the paper's number and the settings that were compared.

A second table (:func:`over_seeds`) sums up each (data set, method) over its seeds: the mean and the sample
standard deviation of the chosen runs' test scores, and the mean of the paired differences to the baseline of
the same seed (over the seeds that both have), :math:`\bar d = \frac1n \sum_s (F_{s}^{m} - F_{s}^{base})`, with
how many of those seeds the method is below the baseline.

Usage::

    python benchmarks/music_table.py benchmarks/results/music_runs/*.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
from music_curves import NAME

PAPER = {  # the AVF paper's test free energies (nats/step, its normalisation)
    ("jsb_chorales", "baseline"): 6.92, ("jsb_chorales", "avf_k1"): 6.97, ("jsb_chorales", "avf_k5"): 6.77,
    ("piano_midi", "baseline"): 8.19, ("piano_midi", "avf_k5"): 8.12,
    ("muse_data", "baseline"): 6.27, ("muse_data", "avf_k5"): 5.99,
    ("nottingham", "baseline"): 3.19, ("nottingham", "avf_k5"): 3.13,
}  # fmt: skip
SETTINGS = ("model_size", "z_dim", "dropout", "crop_length", "lr_drop_patience")


def run_row(path: Path) -> Optional[dict]:
    """The scored run of one history file (None if it was never scored on the test songs)."""
    match = NAME.match(path.stem)
    if match is None:
        raise ValueError(f"{path.name}: expected srnn-<dataset>-<method>-seed<seed>[-<tag>].csv")
    history = pd.read_csv(path)
    if "test_free_energy_paper" not in history or history["test_free_energy_paper"].isna().all():
        return None
    scored = history.dropna(subset=["test_free_energy_paper"]).iloc[-1]
    config_path = path.with_suffix(".config.json")
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return {
        "dataset": match["dataset"], "method": match["method"], "seed": int(match["seed"]), "run": path.stem,
        **{k: config.get(k, 0.0 if k == "dropout" else None) for k in SETTINGS},  # None: no config kept
        "epochs": int(history["epoch"].max()), "best_epoch": int(scored["best_epoch"]),
        "valid": float(scored["valid_free_energy_per_step"]),
        "test": float(scored["test_free_energy_per_step"]), "test_paper": float(scored["test_free_energy_paper"]),
        "cpu_hours": float(history["cpu_time_s"].max()) / 3600,
    }  # fmt: skip


def select(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (data set, method, seed): the run of lowest validation free energy, with how many were compared."""
    groups = runs.groupby(["dataset", "method", "seed"], sort=True)
    chosen = runs.loc[groups["valid"].idxmin()].copy()
    chosen["candidates"] = groups.size().to_numpy()
    chosen["paper"] = [PAPER.get((d, m), float("nan")) for d, m in zip(chosen["dataset"], chosen["method"])]
    chosen["gap_percent"] = 100 * (chosen["test_paper"] / chosen["paper"] - 1)
    return chosen.reset_index(drop=True)


def over_seeds(chosen: pd.DataFrame) -> pd.DataFrame:
    """Per (data set, method): seeds, mean and standard deviation of the test scores in both normalisations,
    and the paired difference to the same seeds' baseline (see the module docstring)."""
    rows = []
    for (dataset, method), group in chosen.groupby(["dataset", "method"], sort=True):
        base = chosen[(chosen["dataset"] == dataset) & (chosen["method"] == "baseline")].set_index("seed")
        paired = group.merge(base[["test", "test_paper"]].reset_index(), on="seed", suffixes=("", "_base"))
        row = {"dataset": dataset, "method": method, "seeds": len(group), "paired": len(paired)}
        for column in ("test", "test_paper"):
            row[f"{column}_mean"] = group[column].mean()
            row[f"{column}_sd"] = group[column].std(ddof=1) if len(group) > 1 else float("nan")
            difference = paired[column] - paired[f"{column}_base"]
            row[f"{column}_vs_baseline"] = difference.mean() if len(paired) else float("nan")
            row[f"{column}_below_baseline"] = int((difference < 0).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def seeds_markdown(summary: pd.DataFrame) -> str:
    lines = [
        "| data set | method | seeds | test, ours: mean ± sd | test, paper's: mean ± sd | vs baseline, ours "
        "(seeds below) | vs baseline, paper's (seeds below) |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(r, column: str) -> str:
        sd = getattr(r, f"{column}_sd")
        return f"{getattr(r, f'{column}_mean'):.3f}" + ("" if pd.isna(sd) else f" ± {sd:.3f}")

    for r in summary.itertuples():
        versus = ["—"] * 2 if r.method == "baseline" or not r.paired else [
            f"{getattr(r, f'{c}_vs_baseline'):+.3f} ({getattr(r, f'{c}_below_baseline')} of {r.paired})"
            for c in ("test", "test_paper")]  # fmt: skip
        lines.append(f"| {r.dataset} | {r.method} | {r.seeds} | {cell(r, 'test')} | {cell(r, 'test_paper')} "
                     f"| {versus[0]} | {versus[1]} |")  # fmt: skip
    return "\n".join(lines)


def markdown(chosen: pd.DataFrame) -> str:
    lines = [
        "| data set | method | seed | chosen settings (size/latents, dropout, crop, LR-drop patience) | of runs "
        "| epochs (best) | valid, ours | **test, ours** | **test, paper's** | paper | gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in chosen.itertuples():
        settings = "not kept" if pd.isna(r.model_size) else (
            f"{int(r.model_size)}/{int(r.z_dim)}, {r.dropout:g}, {int(r.crop_length)}, "
            f"{'—' if pd.isna(r.lr_drop_patience) else int(r.lr_drop_patience)}")  # fmt: skip
        gap = "" if pd.isna(r.paper) else f"{r.gap_percent:+.1f} %"
        paper = "—" if pd.isna(r.paper) else f"{r.paper:.2f}"
        lines.append(
            f"| {r.dataset} | {r.method} | {r.seed} | {settings} | {r.candidates} | {r.epochs} ({r.best_epoch}) "
            f"| {r.valid:.3f} | {r.test:.3f} | {r.test_paper:.3f} | {paper} | {gap} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("histories", nargs="+", type=Path, help="histories named srnn-<dataset>-<method>-seed<s>...csv")
    args = p.parse_args(argv)
    rows = [run_row(path) for path in args.histories if path.suffix == ".csv"]
    runs = pd.DataFrame([r for r in rows if r is not None]).astype({k: object for k in SETTINGS if k != "dropout"})
    chosen = select(runs)
    print(markdown(chosen))
    print()
    print(seeds_markdown(over_seeds(chosen)))
    return chosen


if __name__ == "__main__":
    main()
