"""Peak memory of evaluating one long sequence with ``pyro_avf.evaluation.filtering_free_energy``.

Input: the first T steps of the longest MuseData test song (3,401 steps, real ``muse_data.npz``), batch 1,
SRNN music sizes, untrained weights. Guides: ``IterativeGuide`` (K=5, online evaluation), the same with the
model's parameters frozen (``requires_grad=False``: separates what the model's own autograd graph costs, e.g.
the LSTM over the whole sequence, from what the guide keeps), the same guide streaming the song one step at a
time through :class:`~pyro_avf.online.OnlineFilter` with :class:`~pyro_avf.models.srnn.SRNNStream` (the
deterministic LSTM advanced step by step instead of over the whole song up front), SRNN's baseline
filtering guide (traced over the whole song, model replayed), and that guide streamed step by step
(``baseline_streaming``: :func:`pyro_avf.online.streamed_free_energy` with ``srnn.guide``, what the training command's
evaluation runs).

Each (guide, T) runs in a fresh subprocess: after a 5-step warm-up (lazy update networks, first-call
allocations) the process's peak resident set is reset (``/proc/self/clear_refs``), the evaluation runs, and the
reported peak is ``VmHWM − VmRSS`` before the call (peak extra resident memory, MB). Flat in T means the
slope (MB per 1,000 steps) between the two lengths is near 0.

Usage::

    python benchmarks/memory.py --lengths 500 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GUIDES = ("avf_k5", "avf_k5_frozen_model", "avf_k5_streaming", "baseline", "baseline_streaming")


def _status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


def long_sequence(steps: int) -> torch.Tensor:
    """The first ``steps`` steps of the longest MuseData test song, shaped (1, steps, 88)."""
    from data_loaders.files import default_data_dir
    from data_loaders.polyphonic import load_polyphonic

    song = max(load_polyphonic("muse_data", "test", path=default_data_dir()), key=len)
    if steps > song.shape[0]:
        raise ValueError(f"the longest MuseData test song has {song.shape[0]} steps; asked for {steps}")
    return song[:steps].unsqueeze(0)


def child(guide_name: str, steps: int, hidden_size: int, model_size=None) -> Dict[str, float]:
    """Measure one evaluation in this process (meant to be a fresh one); returns the numbers as a dict."""
    from pyro_avf.evaluation import filtering_free_energy, mean_free_energy_per_step
    from pyro_avf.guide import IterativeGuide
    from pyro_avf.models.srnn import SRNN, SRNNStream
    from pyro_avf.online import OnlineFilter, streamed_free_energy

    if guide_name not in GUIDES:
        raise ValueError(f"unknown guide {guide_name!r}; known: {GUIDES}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    srnn = SRNN.music(**({} if model_size is None else {"d_dim": model_size, "a_dim": model_size,
                                                         "hidden_dim": model_size}))  # fmt: skip
    if guide_name.startswith("baseline"):
        guide = srnn.guide
    else:
        guide = IterativeGuide(srnn.model, num_iterations=5, hidden_size=hidden_size)
        if guide_name == "avf_k5_frozen_model":
            srnn.requires_grad_(False)
    xs = long_sequence(steps)
    mask = torch.ones(xs.shape[:2], dtype=torch.bool)
    filtering_free_energy(srnn.model, guide, xs[:, :5], mask[:, :5])  # warm-up
    if guide_name == "avf_k5_streaming":
        stream = OnlineFilter(SRNNStream(srnn), guide)
        stream.init(batch_size=1)
        stream.step(xs[:, 0])  # warm-up
    rss_before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    if guide_name == "avf_k5_streaming":
        stream.init(batch_size=1)
        total = sum(stream.step(xs[:, t]).free_energy.sum().item() for t in range(steps))
        out = {"free_energy": torch.tensor([[total / steps]]), "observed": torch.ones(1, 1, dtype=torch.bool)}
    elif guide_name == "baseline_streaming":  # what pyro_avf.train's evaluation runs for SRNN's own filter
        total, _ = streamed_free_energy(srnn, srnn.guide, xs, mask)
        out = {"free_energy": torch.tensor([[total / steps]]), "observed": torch.ones(1, 1, dtype=torch.bool)}
    else:
        out = filtering_free_energy(srnn.model, guide, xs, mask)
    seconds = time.perf_counter() - start
    peak_mb = (_status_kb("VmHWM") - rss_before) / 1024
    return {
        "guide": guide_name,
        "steps": steps,
        "peak_extra_mb": peak_mb,
        "seconds": seconds,
        "free_energy_per_step": mean_free_energy_per_step(out),
    }


def run(guides: Sequence[str], lengths: Sequence[int], hidden_size: int, model_size=None) -> List[dict]:
    """One fresh subprocess per (guide, length); returns their result dicts."""
    rows = []
    for guide in guides:
        for steps in lengths:
            cmd = [sys.executable, __file__, "--child", guide, "--lengths", str(steps), "--hidden-size",
                   str(hidden_size)] + ([] if model_size is None else ["--model-size", str(model_size)])  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
            if done.returncode:
                raise RuntimeError(f"memory child {guide} T={steps} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def slopes(rows: List[dict]) -> Dict[str, float]:
    """Per guide: growth of the peak between its shortest and longest run, in MB per 1,000 steps."""
    out = {}
    for guide in dict.fromkeys(r["guide"] for r in rows):
        mine = sorted((r for r in rows if r["guide"] == guide), key=lambda r: r["steps"])
        if len(mine) > 1:
            lo, hi = mine[0], mine[-1]
            out[guide] = 1000 * (hi["peak_extra_mb"] - lo["peak_extra_mb"]) / (hi["steps"] - lo["steps"])
    return out


def markdown(rows: List[dict]) -> str:
    lines = ["| guide | T | peak extra RSS (MB) | eval time (s) | F per step |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['guide']} | {r['steps']} | {r['peak_extra_mb']:.1f} | {r['seconds']:.1f} | "
        f"{r['free_energy_per_step']:.3f} |"
        for r in rows
    ]
    lines += ["", "| guide | growth (MB per 1,000 steps) |", "|---|---|"]
    lines += [f"| {g} | {s:.2f} |" for g, s in slopes(rows).items()]
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--guides", nargs="+", choices=GUIDES, default=list(GUIDES))
    p.add_argument("--hidden-size", type=int, default=1024, help="update network width")
    p.add_argument("--model-size", type=int, default=None, help="SRNN layer width (default: music sizes)")
    p.add_argument("--child", choices=GUIDES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.lengths[0], args.hidden_size, args.model_size)))
        return []
    rows = run(args.guides, args.lengths, args.hidden_size, args.model_size)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
