"""Small synthetic CheXpert downloads and prepared folders shared by the tests/test_data_*.py modules.

Each is made once per test session (cached by its arguments, in a temporary folder removed at exit), so
the data tests stay well under a minute.
"""
import atexit
import os
import shutil
import tempfile

_CACHE = {}
_ROOT = []


def _tmp(name):
    if not _ROOT:
        _ROOT.append(tempfile.mkdtemp(prefix="chexcy-data-tests-"))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    path = os.path.join(_ROOT[0], name)
    os.makedirs(path, exist_ok=True)
    return path


def synthetic_download(n_train=160, n_valid=40, seed=7):
    """Folder holding CheXpert-v1.0-small/ (train.csv, valid.csv, JPEGs) from `chexcy synth`."""
    from chexcy.data.synth import make_synthetic
    key = ("synth", n_train, n_valid, seed)
    if key not in _CACHE:
        out = _tmp(f"synth-{n_train}-{n_valid}-{seed}")
        make_synthetic(out, n_train=n_train, n_valid=n_valid, seed=seed, workers=2)
        _CACHE[key] = out
    return _CACHE[key]


def train_csv(**kwargs):
    return os.path.join(synthetic_download(**kwargs), "CheXpert-v1.0-small", "train.csv")


def valid_csv(**kwargs):
    return os.path.join(synthetic_download(**kwargs), "CheXpert-v1.0-small", "valid.csv")


def prepared(split="train", size=32, **prepare_args):
    """A prepared folder of the default synthetic download (all rows unless filters are given)."""
    from chexcy.data.prepare import prepare
    key = ("prepared", split, size, tuple(sorted(prepare_args.items())))
    if key not in _CACHE:
        out = _tmp(f"prepared-{len(_CACHE)}")
        csv = train_csv() if split == "train" else valid_csv()
        prepare(csv, out, size=size, quiet=True, **prepare_args)
        _CACHE[key] = out
    return _CACHE[key]


def fresh_dir(name):
    """An empty folder, unique to the call."""
    return tempfile.mkdtemp(prefix=name + "-", dir=_tmp("fresh"))


PREPARED_OUTPUTS = ("images.npy", "labels.npy", "meta.csv", "skipped.csv", "manifest.json")


def prepared_bytes(folder):
    """{file name: bytes} of the files a finished prepare leaves, for comparing two runs byte for byte."""
    out = {}
    for name in PREPARED_OUTPUTS:
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def interrupted_prepare(out, monkeypatch, **options):
    """Run prepare of train_csv() into `out` and stop it at its fourth chunk (of 16 rows), as a kill would."""
    import pytest

    from chexcy.data import prepare as prep
    real = prep._decode_chunk
    calls = []

    def dies_on_the_fourth_chunk(task):
        calls.append(task[0])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(task)

    with monkeypatch.context() as patch:
        patch.setattr(prep, "_decode_chunk", dies_on_the_fourth_chunk)
        with pytest.raises(KeyboardInterrupt):
            prep.prepare(train_csv(), out, quiet=True, chunk_rows=16, **options)
    assert os.path.exists(os.path.join(out, "request.json"))
