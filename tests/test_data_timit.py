"""TIMIT loader on a tiny corpus written in the real layout (SPHERE and RIFF WAV files, mixed-case names)."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import torch
from torch.utils.data import DataLoader

from data_loaders.polyphonic import collate_sequences
from data_loaders.timit import TimitStats, list_utterances, load_timit, read_audio, read_sphere

TRAIN_OFFSET, TEST_OFFSET, SCALE = 300, 2000, 1000


def write_sphere(path: Path, samples: np.ndarray, rate=16000, byte_format="01", extra=(), header=None):
    """A NIST SPHERE file as the LDC ships TIMIT: 1024-byte ASCII header, then 16-bit PCM."""
    if header is None:
        fields = [
            "database_id -s5 TIMIT",
            "utterance_id -s8 fake_sa1",
            "channel_count -i 1",
            f"sample_count -i {len(samples)}",
            f"sample_rate -i {rate}",
            "sample_n_bytes -i 2",
            f"sample_byte_format -s2 {byte_format}",
            "sample_sig_bits -i 16",
            *extra,
        ]
        header = "NIST_1A\n   1024\n" + "\n".join(fields) + "\nend_head\n"
    dtype = "<i2" if byte_format == "01" else ">i2"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode().ljust(1024, b" ") + samples.astype(dtype).tobytes())


def write_wav(path: Path, samples: np.ndarray, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.wavfile.write(path, rate, samples.astype(np.int16))


def speech(rng, n, offset):
    return np.round(rng.normal(offset, SCALE, n)).astype(np.int16)


@pytest.fixture
def corpus(tmp_path):
    """Train: 20,000 + 24,150 + 7,999 samples (2 + 3 + 0 clips); test: 10,050 and 3,333 samples."""
    rng = np.random.default_rng(0)
    root = tmp_path / "timit"
    audio = {
        "train": [speech(rng, n, TRAIN_OFFSET) for n in (20_000, 24_150, 7_999)],
        "test": [speech(rng, n, TEST_OFFSET) for n in (10_050, 3_333)],
    }
    a, b, c = audio["train"]
    write_sphere(root / "TRAIN" / "DR1" / "FCJF0" / "SA1.WAV", a)
    write_wav(root / "TRAIN" / "DR1" / "FCJF0" / "SA1.WAV.wav", a)  # converted copy of the same utterance
    write_wav(root / "TRAIN" / "dr2" / "mdab0" / "si1.wav", b)
    write_sphere(root / "TRAIN" / "DR3" / "MJSW0" / "SX1.WAV", c, byte_format="10")
    (root / "TRAIN" / "DR3" / "MJSW0" / "SX1.PHN").write_text("0 7999 h#\n")  # transcripts are ignored
    d, e = audio["test"]
    write_sphere(root / "TEST" / "DR1" / "FAKS0" / "SA2.WAV", d)
    write_wav(root / "TEST" / "DR4" / "MBDG0" / "SX2.WAV", e)
    return root, audio


def test_layout(corpus):
    root, _ = corpus
    train = list_utterances(root, "train")
    assert [p.relative_to(root).as_posix() for p in train] == [
        "TRAIN/DR1/FCJF0/SA1.WAV",
        "TRAIN/dr2/mdab0/si1.wav",
        "TRAIN/DR3/MJSW0/SX1.WAV",
    ]
    assert len(list_utterances(root, "test")) == 2


def test_train_clips_and_statistics(corpus):
    root, audio = corpus
    data, stats = load_timit(root, "train")
    assert len(data) == 2 + 3 + 0
    x, mask = data[0]
    assert x.shape == (40, 200) and x.dtype == torch.float32 and mask.shape == (40,) and mask.all()
    a, b, _ = audio["train"]
    used = np.concatenate([a[:16_000], b[:24_000]]).astype(np.float64)
    assert stats.mean == pytest.approx(used.mean(), rel=1e-12)
    assert stats.std == pytest.approx(used.std(), rel=1e-12)
    assert stats.mean == pytest.approx(TRAIN_OFFSET, abs=20) and stats.std == pytest.approx(SCALE, rel=0.02)
    # clip k of an utterance is steps 40k..40k+39, step t samples 200t..200t+199
    expected = (b[8_000:16_000].reshape(40, 200) - used.mean()) / used.std()
    assert torch.allclose(data[3][0], torch.from_numpy(expected).float(), atol=1e-5)
    everything = torch.stack([data[i][0] for i in range(len(data))])
    assert everything.mean().abs() < 1e-5 and (everything.std(unbiased=False) - 1).abs() < 1e-5


def test_test_split_uses_training_statistics(corpus, tmp_path):
    root, audio = corpus
    _, stats = load_timit(root, "train")
    test, same = load_timit(root, "test", stats=stats)
    assert same == stats
    assert len(test) == 2
    (x0, m0), (x1, m1) = test[0], test[1]
    assert x0.shape == (50, 200) and x1.shape == (16, 200)  # 10,050 // 200 and 3,333 // 200 steps
    assert m0.shape == (50,) and m1.shape == (16,) and m0.all() and m1.all()
    d = audio["test"][0][:10_000].reshape(50, 200).astype(np.float64)
    assert torch.allclose(x0, torch.from_numpy((d - stats.mean) / stats.std).float(), atol=1e-5)
    # normalised with the training statistics, so the louder test audio is not re-centred
    assert x0.mean() == pytest.approx((TEST_OFFSET - TRAIN_OFFSET) / SCALE, abs=0.1)
    # without stats, they are computed from the training split, never from the test data
    _, computed = load_timit(root, "test")
    assert computed == stats
    stats.save(tmp_path / "stats.json")
    assert TimitStats.load(tmp_path / "stats.json") == stats
    x, mask = next(iter(DataLoader(test, batch_size=2, collate_fn=collate_sequences)))
    assert x.shape == (2, 50, 200) and mask.sum(1).tolist() == [50, 16]
    assert x[1, 16:].eq(0).all()


def test_sphere_byte_orders_agree(tmp_path):
    samples = speech(np.random.default_rng(1), 1000, 0)
    write_sphere(tmp_path / "le.wav", samples, byte_format="01")
    write_sphere(tmp_path / "be.wav", samples, byte_format="10")
    for name in ("le.wav", "be.wav"):
        got, rate = read_sphere(tmp_path / name)
        assert rate == 16000 and got.dtype == np.int16 and np.array_equal(got, samples)


def test_missing_folders(tmp_path, corpus):
    root, _ = corpus
    with pytest.raises(FileNotFoundError, match="TIMIT root folder .* does not exist"):
        load_timit(tmp_path / "nowhere", "train")
    (tmp_path / "empty" / "TRAIN").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no TEST folder"):
        load_timit(tmp_path / "empty", "test", stats=TimitStats(0.0, 1.0))
    with pytest.raises(FileNotFoundError, match="no <DR"):
        load_timit(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="unknown TIMIT split 'valid'"):
        load_timit(root, "valid")


def test_wrong_sample_rate(corpus):
    root, _ = corpus
    bad = root / "TRAIN" / "DR5" / "MXXX0" / "SI9.WAV"
    write_wav(bad, np.zeros(9000, np.int16), rate=8000)
    with pytest.raises(ValueError, match="SI9.WAV: sample rate 8000 Hz, expected 16000 Hz"):
        load_timit(root, "train")
    write_sphere(bad, np.zeros(9000, np.int16), rate=22050)
    with pytest.raises(ValueError, match="sample rate 22050 Hz"):
        load_timit(root, "train")


@pytest.mark.parametrize(
    "header, message",
    [
        ("NIST_1A\n  abc\n", "bad header-size line"),
        ("NIST_1A\n   1024\nsample_count -i 10\n", "no end_head"),
        ("NIST_1A\n   1024\nsample_count -i many\nend_head\n", "corrupt SPHERE header line 'sample_count -i many'"),
        ("NIST_1A\n   1024\nsample_rate -i 16000\nsample_n_bytes -i 2\nend_head\n", "sample_count missing"),
        ("NIST_1A\n   9999\nend_head\n", "header size 9999"),
    ],
)
def test_corrupt_sphere_header(tmp_path, header, message):
    path = tmp_path / "SA1.WAV"
    write_sphere(path, np.zeros(100, np.int16), header=header)
    with pytest.raises(ValueError, match=message):
        read_audio(path)


def test_refused_sphere_contents(tmp_path):
    path = tmp_path / "SA1.WAV"
    write_sphere(path, np.zeros(100, np.int16), extra=["sample_coding -s26 pcm,embedded-shorten-v2.00"])
    with pytest.raises(ValueError, match="compressed .*sph2pipe"):
        read_audio(path)
    samples = np.zeros(100, np.int16)
    write_sphere(
        path,
        samples[:50],
        header="NIST_1A\n   1024\nsample_count -i 100\nsample_rate -i 16000\n"
        "sample_n_bytes -i 2\nsample_byte_format -s2 01\nend_head\n",
    )
    with pytest.raises(ValueError, match="announces 100 samples but only 50 follow"):
        read_audio(path)
    path.write_bytes(b"\x00" * 2000)
    with pytest.raises(ValueError, match="neither NIST SPHERE"):
        read_audio(path)
    scipy.io.wavfile.write(path, 16000, np.zeros((100, 2), np.int16))
    with pytest.raises(ValueError, match="expected mono int16"):
        read_audio(path)


def test_truncated_wav_is_an_error_naming_the_file(corpus):
    """scipy only warns (without the file's name) and returns the samples that are there."""
    root, _ = corpus
    bad = root / "TRAIN" / "dr2" / "mdab0" / "si1.wav"
    bad.write_bytes(bad.read_bytes()[:10_000])  # the header announces 24,150 samples
    with pytest.raises(ValueError, match=r"mdab0/si1\.wav: truncated WAV file \(Reached EOF prematurely"):
        load_timit(root, "train")
    bad.write_bytes(bad.read_bytes()[:30])  # not even a whole header
    with pytest.raises(ValueError, match=r"si1\.wav: unreadable WAV file"):
        read_audio(bad)
