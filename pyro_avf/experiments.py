r"""The models and data sets the command line knows (:mod:`pyro_avf.train`): which model fits which data set,
how each model is built for it, and how each data set is loaded into train, validation and test sequences.

Data sets (``--dataset``), by kind:

- **music**, 88 binary keys per step (:mod:`data_loaders.polyphonic`): ``jsb_chorales``, ``piano_midi``,
  ``muse_data``, ``nottingham``; the published train, validation and test songs;
- **speech**, 200-sample frames normalised with the training statistics (:mod:`data_loaders.timit`): ``timit``,
  a user's copy of the licensed corpus (``--data-dir``: the folder holding ``TRAIN`` and ``TEST``, or one holding
  a ``timit`` folder that does); training sequences are the 0.5 s clips of the TRAIN utterances, test
  sequences the whole TEST utterances;
- **video**, frames (C, H, W) of ``--frame-size`` pixels in clips of ``--sequence-length`` frames, the 8-bit
  values dequantized as :math:`(v + u)/256` with one fixed draw of :math:`u \sim U(0, 1)` per split (seeded by
  ``--data-seed``): ``moving_mnist`` (one grey digit bouncing in the frame, generated from the MNIST test
  digits with disjoint train and test digit pools, :mod:`data_loaders.moving_mnist`), ``kth`` (grey, the person
  split of :mod:`data_loaders.kth`) and ``bair`` (RGB robot pushing, :mod:`data_loaders.bair`), both from a
  user's copy (``--data-dir``, or a ``kth`` / ``bair`` folder in it; decoded KTH frames are cached in
  ``~/.cache/pyro_avf/kth``). The clips are held in memory as float32 (BAIR's 43k training trajectories would
  take about 60 GB at 64x64: cap them with ``--train-sequences``), and training crops of ``--crop-length``
  frames are drawn from clips longer than that;
- **simulated**: ``simulated``, sequences of ``--sequence-length`` steps drawn from a random stable LG-SSM
  (4 latent, 8 observed dimensions) seeded by ``--data-seed``.

Validation sequences (``--valid-every``): the published ones (music), the KTH validation persons, new
trajectories of the training digits (Moving MNIST), new draws of the true model (simulated); TIMIT and BAIR
have none, so the last 5 % of the training sequences are held out (and not trained on).

Models (``--model``):

============  ==============  =============================================================================
model         data sets       ``--inference baseline`` (the model's own filter)
============  ==============  =============================================================================
``srnn``      music, speech   SRNN's inference network (:mod:`pyro_avf.models.srnn`)
``vrnn``      music, speech   VRNN's encoder (:mod:`pyro_avf.models.vrnn`)
``dmm``       music, speech   DMM's combiner RNN (:mod:`pyro_avf.models.dmm`)
``svg``       video           SVG-LP's posterior LSTM (:mod:`pyro_avf.models.svg`)
``slvm``      video           none: avf or em only (:mod:`pyro_avf.models.slvm`)
``slvm-1af``  video           none: the SLVM with a 1-AF likelihood (:mod:`pyro_avf.flows`)
``1-af``      video           the only choice: no latent variables, trained and scored on the exact
                              log-likelihood (:class:`~pyro_avf.flows.FlowSequenceModel`, one flow)
``2-af``      video           the same with two stacked flows
``lgssm``     simulated       none: avf or em only (:mod:`pyro_avf.models.lgssm`)
============  ==============  =============================================================================

Scores beside the fit API's ``test_free_energy_per_step`` (:class:`Report`): for video, the test free energy
per sequence (nats per clip of the dequantized values) and in nats per dimension of the 8-bit data,
:math:`(\mathcal{F}_t + D \log 256) / D` with D = C·H·W (``test_nats_per_dim``; an upper bound for the latent
variable models, exact for the flows); for the LG-SSM, the exact negative log-likelihood per step of the test
data under the learned model (Kalman filter, ``test_kalman_nll_per_step``: the free energy of that model is
never below it) and under the true model (``true_kalman_nll_per_step``).
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_loaders import bair, kth
from data_loaders.files import ChecksumError, DataFileNotFoundError, cache_dir, default_data_dir
from data_loaders.moving_mnist import MovingMNIST, dequantize, load_digit_pools, nats_per_dim
from data_loaders.polyphonic import NUM_KEYS, POLYPHONIC_DATASETS, load_polyphonic
from data_loaders.timit import STEP_SAMPLES, load_timit
from pyro_avf.baselines.kalman import kalman_filter
from pyro_avf.flows import AffineAutoregressiveFlow, FlowSequenceModel
from pyro_avf.models.dmm import DMM
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.models.slvm import SLVM
from pyro_avf.models.srnn import SRNN
from pyro_avf.models.svg import SVG
from pyro_avf.models.vrnn import VRNN
from pyro_avf.online import as_stream
from pyro_avf.transition import missing_members

__all__ = ["DATASETS", "MODELS", "Data", "ModelSpec", "Report", "build_model", "check", "load_data", "load_songs",
           "setting", "step_shape", "stream_for", "unused_options"]  # fmt: skip

MUSIC, SPEECH, VIDEO, SIMULATED = "music", "speech", "video", "simulated"
DATASETS: Dict[str, str] = {**{name: MUSIC for name in sorted(POLYPHONIC_DATASETS)}, "timit": SPEECH,
                            "moving_mnist": VIDEO, "kth": VIDEO, "bair": VIDEO, "simulated": SIMULATED}  # fmt: skip
CHANNELS = {"moving_mnist": 1, "kth": 1, "bair": 3}
BAIR_FRAMES = 30  # frames per BAIR trajectory
TRUE_LGSSM = {"latent_dim": 4, "obs_dim": 8}  # the model that simulates --dataset simulated
VALID_FRACTION = 0.05  # of the training sequences held out for validation where a data set has no validation split
# the values that None stands for, by data set
DEFAULTS: Dict[str, Dict[str, int]] = {
    "moving_mnist": {"frame_size": 32, "sequence_length": 10, "train_sequences": 2000, "test_sequences": 200},
    "kth": {"frame_size": 64, "sequence_length": 20},
    "bair": {"frame_size": 64, "sequence_length": BAIR_FRAMES},
    "simulated": {"sequence_length": 20, "train_sequences": 3200, "test_sequences": 256, "z_dim": 4},
}
# training defaults of the data sets that are not music (the command line's defaults are the AVF paper's music
# settings): used where the option is not given, under --preset; measured to give a run that learns in minutes
TRAINING_DEFAULTS: Dict[str, Dict[str, Any]] = {
    **{name: {"lr": 1e-3, "kl_anneal_epochs": 1, "iterations": 1, "hidden_size": 256, "encode_observation": True,
              "epochs": 20, "eval_every": 5} for name in ("moving_mnist", "kth", "bair")},
    "simulated": {"lr": 3e-3, "kl_anneal_epochs": 0, "batch_size": 64, "iterations": 5, "hidden_size": 256,
                  "encode_observation": True, "epochs": 10, "eval_every": 5},
}  # fmt: skip
# the data options of the command line and the data sets they apply to
DATA_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "frame_size": ("moving_mnist", "kth", "bair"),
    "sequence_length": ("moving_mnist", "kth", "bair", "simulated"),
    "train_sequences": ("timit", "moving_mnist", "kth", "bair", "simulated"),
    "test_sequences": ("moving_mnist", "simulated"),
    "data_seed": ("moving_mnist", "kth", "bair", "simulated"),
}


def setting(args: argparse.Namespace, name: str) -> Any:
    """Option ``name``, or the data set's default (:data:`DEFAULTS`) when it is None."""
    value = getattr(args, name, None)
    return DEFAULTS.get(args.dataset, {}).get(name) if value is None else value


def unused_options(args: argparse.Namespace) -> List[str]:
    """The data options that do not apply to ``--dataset`` (left out of the run's settings)."""
    return [name for name, datasets in DATA_OPTIONS.items() if args.dataset not in datasets]


def step_shape(args: argparse.Namespace) -> Tuple[int, ...]:
    """The shape of one step of ``--dataset``: (88,) keys, (200,) samples, (C, S, S) frames or (8,) values."""
    kind = DATASETS[args.dataset]
    if kind == MUSIC:
        return (NUM_KEYS,)
    if kind == SPEECH:
        return (STEP_SAMPLES,)
    if kind == SIMULATED:
        return (TRUE_LGSSM["obs_dim"],)
    size = setting(args, "frame_size")
    return (CHANNELS[args.dataset], size, size)


# ---------------------------------------------------------------------------------------------------------
# Models


def _z(args: argparse.Namespace) -> Dict[str, int]:
    return {} if args.z_dim is None else {"z_dim": args.z_dim}


def _widths(args: argparse.Namespace, *names: str) -> Dict[str, int]:
    """``--model-size`` as the value of every width in ``names`` (none: the model's own sizes)."""
    return {} if args.model_size is None else {name: args.model_size for name in names}


def _srnn(args: argparse.Namespace) -> nn.Module:
    make = SRNN.speech if DATASETS[args.dataset] == SPEECH else SRNN.music
    return make(**_z(args), **_widths(args, "d_dim", "a_dim", "hidden_dim"), dropout=getattr(args, "dropout", 0.0))


def _vrnn(args: argparse.Namespace) -> nn.Module:
    make = VRNN.speech if DATASETS[args.dataset] == SPEECH else VRNN.music
    return make(**_z(args), **_widths(args, "h_dim", "phi_dim", "hidden_dim"))


def _dmm(args: argparse.Namespace) -> nn.Module:
    speech = DATASETS[args.dataset] == SPEECH
    likelihood = "gaussian" if speech else "bernoulli"
    widths = _widths(args, "emission_dim", "transition_dim", "rnn_dim")
    return DMM(x_dim=step_shape(args)[0], likelihood=likelihood, **_z(args), **widths)


def _svg(args: argparse.Namespace) -> nn.Module:
    return SVG(step_shape(args), **_z(args), **_widths(args, "g_dim", "rnn_size"))


def _flow_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The flows of ``benchmarks/flows.py``: 3x3 conv networks of 3 layers on the last 2 frames."""
    return {"network": "conv", "hidden": args.model_size or 16, "num_layers": 3, "window": 2}


def _slvm(args: argparse.Namespace) -> nn.Module:
    shape = step_shape(args)
    flow = AffineAutoregressiveFlow(shape, **_flow_kwargs(args)) if args.model == "slvm-1af" else None
    return SLVM(shape, **_z(args), **_widths(args, "d_dim", "e_dim", "hidden"), flow=flow)


def _flow(args: argparse.Namespace) -> nn.Module:
    return FlowSequenceModel(step_shape(args), num_flows=int(args.model[0]), base="learned", **_flow_kwargs(args))


def _lgssm(args: argparse.Namespace) -> nn.Module:
    """A learnable LG-SSM started at a random stable model drawn from the seeded global generator."""
    seed = int(torch.randint(2**31 - 1, ()).item())
    return LinearGaussianSSM.random(setting(args, "z_dim"), TRUE_LGSSM["obs_dim"], seed=seed, learnable=True)


@dataclass(frozen=True)
class ModelSpec:
    """A model of the command line: the kinds of data it fits, its builder, whether it has a filter of its own
    (``model.guide``) and whether it has latent variables at all."""

    kinds: Tuple[str, ...]
    build: Callable[[argparse.Namespace], nn.Module]
    own_filter: bool = True
    latent: bool = True


MODELS: Dict[str, ModelSpec] = {
    "srnn": ModelSpec((MUSIC, SPEECH), _srnn),
    "vrnn": ModelSpec((MUSIC, SPEECH), _vrnn),
    "dmm": ModelSpec((MUSIC, SPEECH), _dmm),
    "svg": ModelSpec((VIDEO,), _svg),
    "slvm": ModelSpec((VIDEO,), _slvm, own_filter=False),
    "slvm-1af": ModelSpec((VIDEO,), _slvm, own_filter=False),
    "1-af": ModelSpec((VIDEO,), _flow, latent=False),
    "2-af": ModelSpec((VIDEO,), _flow, latent=False),
    "lgssm": ModelSpec((SIMULATED,), _lgssm, own_filter=False),
}


def datasets_of(model: str) -> List[str]:
    """The data sets ``model`` fits."""
    return [name for name, kind in DATASETS.items() if kind in MODELS[model].kinds]


def build_model(args: argparse.Namespace) -> nn.Module:
    """``--model`` for ``--dataset``, with the optional ``--z-dim`` / ``--model-size`` overrides."""
    return MODELS[args.model].build(args)


def stream_for(model: nn.Module) -> Optional[Callable[[Any], Any]]:
    """How :func:`~pyro_avf.training.fit` streams ``model`` in evaluation: :func:`~pyro_avf.online.as_stream` for
    a step model (:mod:`pyro_avf.transition`), None (one pass over whole sequences) for the flows."""
    return None if missing_members(model) else as_stream


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a model on a data set it does not fit, an inference it cannot do and data options that do not
    apply or cannot work, with ``parser.error`` (exit status 2)."""
    spec = MODELS[args.model]
    if DATASETS[args.dataset] not in spec.kinds:
        parser.error(f"--model {args.model} does not fit --dataset {args.dataset}; the data sets of {args.model} "
                     f"are: {', '.join(datasets_of(args.model))}")  # fmt: skip
    if not spec.latent and args.inference != "baseline":
        parser.error(f"--inference {args.inference}: --model {args.model} has no latent variables to infer (its "
                     "log-likelihood is exact); use --inference baseline, which trains and tests it on the exact "
                     "log-likelihood")  # fmt: skip
    if spec.latent and args.inference == "baseline" and not spec.own_filter:
        parser.error(f"--inference baseline trains the model's own filter, but --model {args.model} has none (no "
                     "guide); use --inference avf (amortized filtering) or em (non-amortized filtering)")  # fmt: skip
    for name, datasets in DATA_OPTIONS.items():
        flag, value = f"--{name.replace('_', '-')}", getattr(args, name)
        if value is not None and name != "data_seed" and args.dataset not in datasets:
            parser.error(f"{flag} applies to --dataset {', '.join(datasets)}, not {args.dataset}")
        if value is not None and value < (0 if name == "data_seed" else 1):
            sign = "non-negative" if name == "data_seed" else "positive"
            parser.error(f"{flag} must be a {sign} integer, got {value}")
    size = setting(args, "frame_size")
    if size is not None and (size < 8 or size & (size - 1)):
        parser.error(f"--frame-size must be a power of two >= 8 (the convolutional encoders halve frames down to "
                     f"4x4), got {size}")  # fmt: skip
    if args.dataset == "bair" and setting(args, "sequence_length") > BAIR_FRAMES:
        parser.error(f"--sequence-length: a BAIR trajectory has {BAIR_FRAMES} frames, got {args.sequence_length}")


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Data:
    """The sequences of a data set, each split a list of (T_i, ...) tensors or one (N, T, ...) tensor (``valid``
    None without ``--valid-every``), and ``truth``, the model that simulated them (``simulated`` only)."""

    train: Any
    test: Any
    valid: Any = None
    truth: Optional[LinearGaussianSSM] = None


def load_data(args: argparse.Namespace) -> Data:
    """``--dataset`` as train, validation (with ``--valid-every``) and test sequences, the test and validation
    sequences cut to ``--max-eval-songs`` / ``--max-valid-songs``; a missing or unreadable data file ends the
    command with one line naming it."""
    loaders = {MUSIC: _music, SPEECH: _timit, VIDEO: _video, SIMULATED: _simulated}
    data = loaders[DATASETS[args.dataset]](args)
    data.test = data.test[: args.max_eval_songs]
    data.valid = None if data.valid is None else data.valid[: args.max_valid_songs]
    return data


def data_error(args: argparse.Namespace, split: str, err: Exception) -> str:
    """The one-line message of a data file that is missing, corrupt or unreadable, naming it and what to do."""
    if isinstance(err, DataFileNotFoundError):
        where = ", ".join(str(p) for p in err.places)
        fetch = f"pass --download to fetch it from {err.url}, or " if err.url and not args.download else ""
        message = f"data file {err.data_file} not found (looked in: {where}); {fetch}put it in the --data-dir folder"
    elif isinstance(err, ChecksumError):
        message = (f"data file {err.path} is corrupt, truncated or another version (its SHA-256 is {err.actual}, "
                   f"expected {err.expected}); delete it and run again with --download, or pass --data-dir with a "
                   "good copy")  # fmt: skip
    else:  # a failed download, a file that passes its checksum but not parsing, a broken user copy
        message = f"cannot load the {args.dataset} {split} data: {err}"
    return " ".join(message.split())


def _guarded(args: argparse.Namespace, split: str, load: Callable[[], Any]) -> Any:
    """``load()``, a data error ending the command with :func:`data_error`'s line."""
    try:
        return load()
    except (OSError, ValueError, ImportError) as err:
        raise SystemExit(data_error(args, split, err)) from None


def load_songs(args: argparse.Namespace, split: str) -> List[Tensor]:
    """One split of a music data set (:func:`~data_loaders.polyphonic.load_polyphonic`)."""
    data_dir = args.data_dir or default_data_dir()
    return _guarded(args, split, lambda: load_polyphonic(args.dataset, split, path=data_dir, download=args.download))


def _music(args: argparse.Namespace) -> Data:
    train, test = load_songs(args, "train"), load_songs(args, "test")
    return Data(train, test, load_songs(args, "valid") if args.valid_every else None)


def _hold_out(train: Any, args: argparse.Namespace) -> Tuple[Any, Any]:
    """``(train, None)``, or with ``--valid-every`` the last :data:`VALID_FRACTION` of ``train`` split off."""
    if not args.valid_every:
        return train, None
    held = max(1, round(VALID_FRACTION * len(train)))
    if held >= len(train):
        raise SystemExit(f"--valid-every: {args.dataset} has no validation split and its {len(train)} training "
                         "sequence(s) are too few to hold some out; pass --valid-every 0")  # fmt: skip
    return train[:-held], train[-held:]


def _user_root(args: argparse.Namespace, names: Tuple[str, ...], fits: Callable[[Path], bool], what: str) -> Path:
    """The folder of a user's copy of a data set: ``--data-dir`` (or the default data folder) itself or one of
    its sub-folders ``names``, the first one that ``fits``; else the command ends with one line."""
    base = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    places = [] if base is None else [base, *(base / name for name in names)]
    for place in places:
        if place.is_dir() and fits(place):
            return place
    looked = ", ".join(str(p) for p in places) or "no folder: no --data-dir and no default data folder"
    raise SystemExit(f"{what} not found (looked in: {looked}); this project cannot download it: pass --data-dir "
                     "with your copy")  # fmt: skip


def _has_child(folder: Path, name: str) -> bool:
    return any(p.is_dir() and p.name.lower() == name for p in folder.iterdir())


def _timit(args: argparse.Namespace) -> Data:
    what = "TIMIT (licensed by the LDC: <root>/TRAIN|TEST/DR*/<speaker>/*.WAV)"
    root = _user_root(args, ("timit", "TIMIT"), lambda p: _has_child(p, "train"), what)
    train_set, stats = _guarded(args, "train", lambda: load_timit(root, "train"))
    test_set, _ = _guarded(args, "test", lambda: load_timit(root, "test", stats=stats))
    train = [train_set[i][0] for i in range(len(train_set))][: args.train_sequences]
    train, valid = _hold_out(train, args)
    return Data(train, [test_set[i][0] for i in range(len(test_set))], valid)


def _simulated(args: argparse.Namespace) -> Data:
    """Sequences of the true LG-SSM (:data:`TRUE_LGSSM`, seeded by ``--data-seed``), each split its own seed."""
    seed, steps = args.data_seed, setting(args, "sequence_length")
    truth = LinearGaussianSSM.random(**TRUE_LGSSM, seed=seed)
    count = setting(args, "test_sequences")
    train = truth.sample(setting(args, "train_sequences"), steps, seed=seed + 1)[0]
    valid = truth.sample(count, steps, seed=seed + 3)[0] if args.valid_every else None
    return Data(train, truth.sample(count, steps, seed=seed + 2)[0], valid, truth)


def _video(args: argparse.Namespace) -> Data:
    """uint8 clips (N, T, C, S, S) of the video data set, dequantized with one fixed draw per split."""
    loaders = {"moving_mnist": _moving_mnist, "kth": _kth, "bair": _bair}
    clips = loaders[args.dataset](args, setting(args, "frame_size"), setting(args, "sequence_length"))
    noisy = {}
    for k, split in enumerate(("train", "test", "valid")):
        x = clips.get(split)
        noisy[split] = None if x is None else dequantize(x, torch.Generator().manual_seed(3 * args.data_seed + k))
    return Data(noisy["train"], noisy["test"], noisy["valid"])


def _stack(items: Any, count: Optional[int] = None) -> Tensor:
    """The first ``count`` items (all: None) of a data set of clips, stacked."""
    n = len(items) if count is None else min(count, len(items))
    if n == 0:
        raise ValueError("no clips: every video is shorter than --sequence-length")
    return torch.stack([items[i] for i in range(n)])


def _to_uint8(x: Tensor) -> Tensor:
    """Values ``v / 255`` in [0, 1] back to the 8-bit ``v``."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _moving_mnist(args: argparse.Namespace, size: int, length: int) -> Dict[str, Tensor]:
    data_dir = args.data_dir or default_data_dir()
    pools = _guarded(args, "train", lambda: load_digit_pools(data_dir, download=args.download))
    options = dict(num_frames=length, frame_size=size, num_digits=1, as_uint8=True)
    counts = {"train": setting(args, "train_sequences"), "test": setting(args, "test_sequences"),
              "valid": setting(args, "test_sequences") if args.valid_every else 0}  # fmt: skip
    pool = {"train": "train", "test": "test", "valid": "train"}  # validation: new trajectories of training digits
    seed = {"train": 0, "test": 1, "valid": 2}  # the seeds of moving_mnist_splits, and one more
    return {split: _stack(MovingMNIST(pools[pool[split]][0], n, seed=args.data_seed + seed[split], **options))
            for split, n in counts.items() if n}  # fmt: skip


def _kth(args: argparse.Namespace, size: int, length: int) -> Dict[str, Tensor]:
    what = "KTH Actions (<root>/<action>/personXX_<action>_dY_uncomp.avi)"
    root = _user_root(args, ("kth", "KTH"), lambda p: any((p / a).is_dir() for a in kth.ACTIONS), what)
    splits = ("train", "test", "valid") if args.valid_every else ("train", "test")
    counts = {"train": args.train_sequences}

    def clips(split: str) -> Tensor:
        dataset = kth.KTHDataset(root, split, clip_length=length, frame_size=size, cache_dir=cache_dir() / "kth")
        return _to_uint8(_stack(dataset, counts.get(split)))

    return {split: _guarded(args, split, functools.partial(clips, split)) for split in splits}


def _resize(frames: Tensor, size: int) -> Tensor:
    """uint8 frames (..., C, H, W) resized to (..., C, size, size) (antialiased bilinear), rounded to uint8."""
    if frames.shape[-1] == size and frames.shape[-2] == size:
        return frames
    flat = frames.reshape(-1, *frames.shape[-3:]).float()
    small = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return small.round().clamp(0, 255).to(torch.uint8).reshape(*frames.shape[:-2], size, size)


def _bair(args: argparse.Namespace, size: int, length: int) -> Dict[str, Tensor]:
    what = "BAIR robot pushing (<root>/softmotion30_44k/train|test/traj_*_to_*.tfrecords)"
    fits = lambda p: p.name == "softmotion30_44k" or (p / "softmotion30_44k").is_dir()  # noqa: E731
    root = _user_root(args, ("bair", "BAIR"), fits, what)

    def clips(split: str, count: Optional[int]) -> Tensor:
        dataset = bair.BAIRDataset(root, split, num_frames=length)
        n = len(dataset) if count is None else min(count, len(dataset))
        frames = torch.stack([torch.from_numpy(dataset.frames(i)).permute(0, 3, 1, 2) for i in range(n)])
        return _resize(frames, size)

    train = _guarded(args, "train", lambda: clips("train", args.train_sequences))
    train, valid = _hold_out(train, args)
    return {"train": train, "test": _guarded(args, "test", lambda: clips("test", None)), "valid": valid}


# ---------------------------------------------------------------------------------------------------------
# Scores


class Report:
    """The data set's own scores, added to every results row that has a test free energy (see the module
    docstring), and the words the command prints about them at the end."""

    def __init__(self, args: argparse.Namespace, data: Data, model: nn.Module):
        self.kind, self.model, self.data = DATASETS[args.dataset], model, data
        self.dims = math.prod(step_shape(args))
        self.kalman: Dict[int, float] = {}  # the learned LG-SSM's exact NLL per step, by epoch
        self.true_nll = None if data.truth is None else self._kalman_nll(data.truth)

    def _kalman_nll(self, ssm: LinearGaussianSSM) -> float:
        """The exact :math:`-\\log p(x)` per step of the test sequences under ``ssm`` (Kalman filter)."""
        with torch.no_grad():
            A, C, Q, R = (p.detach().cpu() for p in (ssm.A, ssm.C, ssm.Q, ssm.R))
            return kalman_filter(A, C, Q, R, self.data.test).nll.mean().item()

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        if self.data.truth is not None:
            self.kalman[row["epoch"]] = self._kalman_nll(self.model)
        if "test_free_energy_per_step" not in row:
            return row
        per_step = row["test_free_energy_per_step"]
        if self.kind == VIDEO:
            row["test_free_energy_per_sequence"] = per_step * row["test_steps"] / len(self.data.test)
            row["test_nats_per_dim"] = nats_per_dim(per_step, self.dims).item()
        if self.data.truth is not None:
            tested = row.get("tested_epoch", row["epoch"])  # the parameters that gave the free energy
            if tested in self.kalman:
                row["test_kalman_nll_per_step"] = self.kalman[tested]
            row["true_kalman_nll_per_step"] = self.true_nll
        return row

    @staticmethod
    def summary(row: Dict[str, Any]) -> str:
        """The scores of ``row`` beyond the free energy per step, as words (empty when there are none)."""
        words = []
        has = lambda key: isinstance(row.get(key), float) and math.isfinite(row[key])  # noqa: E731
        if has("test_free_energy_paper"):
            words.append(f"{row['test_free_energy_paper']:.4f} in the AVF paper's normalisation (first step of each "
                         "sequence left out, mean over sequences)")  # fmt: skip
        if has("test_nats_per_dim"):
            words.append(f"{row['test_free_energy_per_sequence']:.1f} nats/sequence, {row['test_nats_per_dim']:.4f} "
                         "nats/dim of the 8-bit frames")  # fmt: skip
        if has("test_kalman_nll_per_step"):
            words.append(f"exact NLL (Kalman filter) of the learned LG-SSM {row['test_kalman_nll_per_step']:.4f} "
                         f"nats/step, of the true one {row['true_kalman_nll_per_step']:.4f}")  # fmt: skip
        return "".join(f"; {w}" for w in words)
