"""Polyphonic music loaders, and the file lookup/checksum layer they rest on, on the real data files."""

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_loaders.files import ChecksumError, default_data_dir, find_data_file
from data_loaders.polyphonic import (
    JSB_PICKLE_FILE,
    JSB_PICKLE_SHA256,
    POLYPHONIC_DATASETS,
    RandomCropDataset,
    SequenceDataset,
    UnsafePickleError,
    check_npz_arrays,
    collate_sequences,
    load_jsb_pickle,
    load_npz,
    load_polyphonic,
    parse_jsb_pickle,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POLY = DATA / "polyphonic"


@pytest.fixture(autouse=True)
def _isolated_lookup(monkeypatch, tmp_path):
    """No user data folder, and a private empty cache, for every test."""
    monkeypatch.delenv("PYRO_AVF_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def jsb():
    if not POLY.is_dir():
        pytest.skip(f"shared data folder {POLY} not present")
    return load_jsb_pickle(DATA)


def _needs_data():
    if not POLY.is_dir():
        pytest.skip(f"shared data folder {POLY} not present")


# ----------------------------------------------------------------------------------------------- pickle


def test_jsb_pickle_splits(jsb):
    assert {k: len(v) for k, v in jsb.items()} == {"train": 229, "valid": 76, "test": 77}
    for songs in jsb.values():
        for song in songs:
            assert song.dtype == torch.float32 and song.ndim == 2 and song.shape[1] == 88
            assert set(song.unique().tolist()) <= {0.0, 1.0}
            assert song.sum(1).max() <= 4  # four-voice chorales
    assert sum(len(s) for s in jsb["test"]) == 4725


def test_jsb_npz_is_pickle_at_double_resolution(jsb):
    """Every quarter-note test song equals the even steps of one SRNN test song: same 21..108 key mapping."""
    npz_songs = load_polyphonic("jsb_chorales", "test", source="npz", path=DATA)
    for song in jsb["test"]:
        matches = [x for x in npz_songs if len(x) in (2 * len(song) - 1, 2 * len(song)) and torch.equal(x[::2], song)]
        assert matches, f"no SRNN test song matches a pickle song of {len(song)} steps"


def test_pickle_maps_midi_notes_to_columns():
    notes = [(np.int64(21), np.int64(108)), (), (np.int64(60),)]
    data = pickle.dumps({"train": [notes], "valid": [], "test": []}, protocol=4)  # py2's protocol 2 needs _codecs
    roll = parse_jsb_pickle(data)["train"][0]
    expected = torch.zeros(3, 88)
    expected[0, 0] = expected[0, 87] = expected[2, 39] = 1.0
    assert torch.equal(roll, expected)


@pytest.mark.parametrize("note", [20, 109])
def test_pickle_note_out_of_range(note):
    data = pickle.dumps({"train": [[(60,)], [(64, note)]], "valid": [], "test": []}, protocol=2)
    with pytest.raises(ValueError, match=f"train song 1, step 0: MIDI note {note} is outside"):
        parse_jsb_pickle(data)


def test_pickle_wrong_structure():
    with pytest.raises(ValueError, match="keys"):
        parse_jsb_pickle(pickle.dumps({"train": []}, protocol=2))


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def test_forbidden_global_refused_before_running(tmp_path):
    marker = tmp_path / "ran"
    # PROTO 2; GLOBAL os.system; BINUNICODE "touch <marker>"; TUPLE1; REDUCE; STOP
    data = b"\x80\x02" + b"cos\nsystem\n" + _unicode(f"touch {marker}") + b"\x85" + b"R" + b"."
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        parse_jsb_pickle(data)
    assert not marker.exists()


def test_other_numpy_globals_refused():
    data = b"\x80\x02" + b"cnumpy.core.multiarray\n_reconstruct\n" + b")R."
    with pytest.raises(UnsafePickleError, match=r"numpy\.core\.multiarray\._reconstruct"):
        parse_jsb_pickle(data)


def test_object_dtype_refused():
    # GLOBAL numpy.dtype; SHORT_BINSTRING "O8"; TUPLE1; REDUCE: the allowed constructor with a forbidden dtype
    data = b"\x80\x02" + b"cnumpy\ndtype\n" + b"U\x02O8" + b"\x85R."
    with pytest.raises(UnsafePickleError, match="only integer dtypes"):
        parse_jsb_pickle(data)


def test_tampered_pickle_refused(tmp_path):
    _needs_data()
    copy = tmp_path / JSB_PICKLE_FILE
    data = bytearray((POLY / JSB_PICKLE_FILE).read_bytes())
    data[1000] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        load_jsb_pickle(tmp_path)
    message = str(err.value)
    assert JSB_PICKLE_FILE in message and JSB_PICKLE_SHA256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message


# ----------------------------------------------------------------------------------------------- npz


@pytest.mark.parametrize(
    "name, songs, steps, longest",
    [
        ("jsb_chorales", 77, 9_396, 319),
        ("nottingham", 170, 37_062, 1_494),
        ("piano_midi", 25, 17_328, 2_304),
        ("muse_data", 124, 67_391, 3_401),
    ],
)
def test_npz_test_songs(name, songs, steps, longest):
    _needs_data()
    test = load_polyphonic(name, "test", source="npz", path=DATA)
    assert len(test) == songs
    assert sum(len(s) for s in test) == steps
    assert max(len(s) for s in test) == longest
    assert all(s.shape[1] == 88 and s.dtype == torch.float32 for s in test)


def test_npz_training_pieces():
    _needs_data()
    arrays = load_npz("jsb_chorales", POLY)
    train = load_polyphonic("jsb_chorales", "train", source="npz", path=POLY)
    assert len(train) == arrays["x_train"].shape[0] == 272
    assert all(piece.shape == (100, 88) for piece in train)
    # u is x shifted one step: u[t] = x[t - 1] inside a piece
    assert np.array_equal(arrays["u_train"][:, 1:], arrays["x_train"][:, :-1])


def test_tampered_npz_refused(tmp_path):
    _needs_data()
    data = bytearray((POLY / "piano_midi.npz").read_bytes())
    data[-10] ^= 0x01
    (tmp_path / "piano_midi.npz").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="piano_midi.npz"):
        load_polyphonic("piano_midi", "test", path=tmp_path)


def test_npz_found_under_its_source_name(tmp_path, monkeypatch):
    _needs_data()
    (tmp_path / "piano_midi_raw_batchsize16_seqlen100.npz").symlink_to(POLY / "piano_midi.npz")
    assert len(load_polyphonic("piano_midi", "test", path=tmp_path)) == 25
    monkeypatch.setenv("PYRO_AVF_DATA", str(DATA))  # a data folder with a polyphonic/ sub-folder
    assert len(load_polyphonic("piano_midi", "test")) == 25


def test_npz_wrong_shapes_refused():
    arrays = {k: np.zeros((2, 100, 88), np.float32) for k in ("x_train", "u_train", "x_valid", "u_valid")}
    arrays.update(x_test=np.zeros((2, 7, 88), np.float32), u_test=np.zeros((2, 7, 88), np.float32))
    arrays["mask_test"] = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match=r"mask_test has shape \(2, 8\)"):
        check_npz_arrays(arrays)
    del arrays["u_valid"]
    with pytest.raises(ValueError, match="missing arrays"):
        check_npz_arrays(arrays)


def test_registry_and_bad_arguments():
    assert set(POLYPHONIC_DATASETS) == {"jsb_chorales", "nottingham", "piano_midi", "muse_data"}
    assert POLYPHONIC_DATASETS["jsb_chorales"].default_source == "pickle"
    with pytest.raises(KeyError, match="unknown polyphonic data set 'bach'"):
        load_polyphonic("bach", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_polyphonic("nottingham", "dev")
    with pytest.raises(ValueError, match="no 'pickle' source"):
        load_polyphonic("nottingham", "train", source="pickle")


# ----------------------------------------------------------------------------------------------- datasets


def test_random_crops(jsb):
    songs = jsb["train"][:20] + [torch.ones(10, 88)]
    data = RandomCropDataset(songs, length=25, seed=3)
    for i, song in enumerate(songs[:20]):
        crop, mask = data[i]
        assert crop.shape == (25, 88) and mask.dtype == torch.bool and mask.all()
        windows = song.unfold(0, 25, 1).permute(0, 2, 1)  # every 25-step window of the song
        assert (windows == crop).all(-1).all(-1).any()
    crop, mask = data[20]
    assert crop.shape == (25, 88)
    assert mask[:10].all() and not mask[10:].any()
    assert crop[:10].eq(1).all() and crop[10:].eq(0).all()


def test_random_crops_deterministic(jsb):
    songs = jsb["train"]

    def crops(seed):
        data = RandomCropDataset(songs, length=25, seed=seed)
        return torch.stack([data[i][0] for i in range(len(songs))])

    assert torch.equal(crops(0), crops(0))
    assert not torch.equal(crops(0), crops(1))
    with pytest.raises(ValueError, match="crop length"):
        RandomCropDataset(songs, length=0)


def test_collate_whole_songs(jsb):
    songs = jsb["test"][:5]
    x, mask = next(iter(DataLoader(SequenceDataset(songs), batch_size=5, collate_fn=collate_sequences)))
    lengths = [len(s) for s in songs]
    assert x.shape == (5, max(lengths), 88) and mask.shape == (5, max(lengths)) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == lengths
    for i, song in enumerate(songs):
        assert torch.equal(x[i, : len(song)], song)
        assert x[i, len(song) :].eq(0).all()


def test_collate_crops_in_a_loader(jsb):
    torch.manual_seed(0)
    loader = DataLoader(RandomCropDataset(jsb["train"], 25), batch_size=16, shuffle=True, collate_fn=collate_sequences)
    x, mask = next(iter(loader))
    assert x.shape == (16, 25, 88) and mask.shape == (16, 25) and mask.all()


# ----------------------------------------------------------------------------------------------- file lookup


def _payload(tmp_path):
    source = tmp_path / "src" / "notes.bin"
    source.parent.mkdir()
    source.write_bytes(b"do re mi" * 1000)
    return source, hashlib.sha256(source.read_bytes()).hexdigest()


def test_lookup_order(tmp_path, monkeypatch):
    source, digest = _payload(tmp_path)
    assert find_data_file("notes.bin", digest, path=source) == source  # a file
    assert find_data_file("notes.bin", digest, path=source.parent) == source  # a folder
    assert find_data_file("renamed.bin", digest, path=source.parent, aliases=["notes.bin"]) == source
    monkeypatch.setenv("PYRO_AVF_DATA", str(tmp_path))
    assert find_data_file("notes.bin", digest, subdir="src") == source  # env folder, sub-folder
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_data_file("notes.bin", digest, path=tmp_path / "nowhere")


def test_not_found_names_places(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"notes\.bin not found .*download=True"):
        find_data_file("notes.bin", "0" * 64, url="https://example.invalid/notes.bin", path=tmp_path)


def test_download_into_cache(tmp_path):
    source, digest = _payload(tmp_path)
    got = find_data_file("notes.bin", digest, url=source.as_uri(), download=True, subdir="x", progress=False)
    assert got == tmp_path / "cache" / "pyro_avf" / "x" / "notes.bin"
    assert got.read_bytes() == source.read_bytes()
    assert find_data_file("notes.bin", digest, subdir="x") == got  # found in the cache, no url needed


def test_download_with_wrong_digest_leaves_nothing(tmp_path):
    source, digest = _payload(tmp_path)
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64}, got {digest}"):
        find_data_file("notes.bin", "0" * 64, url=source.as_uri(), download=True, progress=False)
    assert not any((tmp_path / "cache").rglob("notes.bin*"))


def test_default_data_dir_is_shared_folder():
    _needs_data()
    assert default_data_dir().resolve() == DATA.resolve()


def test_https_download_goes_through_pooch_and_checks_the_digest(tmp_path, monkeypatch):
    """Offline: pooch's HTTP downloader is replaced by one that serves the payload and records the address."""
    import pooch

    source, digest = _payload(tmp_path)
    requested = []

    def serve(self, url, output_file, pooch_, check_only=False):
        requested.append(url)
        Path(output_file).write_bytes(source.read_bytes())

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", serve)
    url = "https://example.invalid/data/notes.bin"
    got = find_data_file("notes.bin", digest, url=url, download=True, subdir="x", progress=False)
    assert got == tmp_path / "cache" / "pyro_avf" / "x" / "notes.bin" and got.read_bytes() == source.read_bytes()
    assert requested == [url]
    assert find_data_file("notes.bin", digest, url=url, download=True, subdir="x") == got and requested == [url]
    with pytest.raises(ChecksumError, match=f"data file {url}: expected {'0' * 64}, got {digest}"):
        find_data_file("other.bin", "0" * 64, url=url, download=True, subdir="x", progress=False)
    assert sorted(p.name for p in got.parent.iterdir()) == ["notes.bin"]  # nothing of the bad download is left
