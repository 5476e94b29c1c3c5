"""Loader, augmentation and study index: batch contents, determinism and exact resume, no flips."""
import numpy as np
import pytest

from chexcy.data import (
    PIXEL_MEAN, PIXEL_STD, BatchLoader, ChestAugment, PreparedDataset, StudyIndex, StudyLoader, normalize,
)
from chexcy.data.augment import hashed_uniform

from data_fixtures import prepared


@pytest.fixture(scope="module")
def ds():
    return PreparedDataset(prepared(size=32))


def _same(a, b):
    assert type(a) is type(b)
    for name, x, y in zip(a._fields, a, b):
        np.testing.assert_array_equal(x, y, err_msg=f"field {name}")


def test_normalize_uses_the_documented_constants():
    x = np.array([0, 128, 255], dtype=np.uint8)
    np.testing.assert_allclose(normalize(x), (x - PIXEL_MEAN) / PIXEL_STD)
    assert normalize(x).dtype == np.float32
    assert (PIXEL_MEAN, PIXEL_STD) == (128.0, 64.0)


def test_batch_contents(ds):
    loader = BatchLoader(ds, 16, shuffle=False, workers=1)
    batches = list(loader.batches(0))
    assert len(batches) == len(loader) == -(-len(ds) // 16)
    rows = np.concatenate([b.index for b in batches])
    np.testing.assert_array_equal(rows, np.arange(len(ds)))
    b = batches[1]
    assert b.images.dtype == np.float32 and b.images.shape == (16, 1, 32, 32)
    np.testing.assert_array_equal(b.images, normalize(ds.images[16:32]))
    present = ~np.isnan(ds.labels[16:32])
    np.testing.assert_array_equal(b.mask, present.astype(np.float32))
    np.testing.assert_array_equal(b.labels, np.where(present, ds.labels[16:32], 0))
    assert b.index.dtype == np.int64 and b.tabular.dtype == np.float32 and b.tabular.shape == (16, 2)
    sex = ds.meta["sex"][16:32].map({"Male": 1.0, "Female": 0.0}).fillna(0.5).to_numpy()
    np.testing.assert_allclose(b.tabular[:, 0], ds.meta["age"][16:32] / 100, rtol=1e-6)
    np.testing.assert_array_equal(b.tabular[:, 1], sex)
    assert len(batches[-1].index) == len(ds) - 16 * (len(batches) - 1)
    assert len(BatchLoader(ds, 16, drop_last=True)) == len(ds) // 16


def test_epoch_order_is_a_permutation_from_seed_and_epoch(ds):
    a = BatchLoader(ds, 8, seed=3)
    b = BatchLoader(ds, 8, seed=3, workers=2)
    np.testing.assert_array_equal(np.sort(a.order(0)), np.arange(len(ds)))
    np.testing.assert_array_equal(a.order(1), b.order(1))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), BatchLoader(ds, 8, seed=4).order(0))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_mid_epoch_yields_exactly_the_tail(ds, workers):
    loader = BatchLoader(ds, 12, seed=5, augment=True, workers=workers, prefetch=3)
    full = list(loader.batches(2))
    tail = list(loader.batches(2, start=4))
    assert len(tail) == len(full) - 4
    for x, y in zip(full[4:], tail):
        _same(x, y)
    reference = list(BatchLoader(ds, 12, seed=5, augment=True, workers=0).batches(2))
    for x, y in zip(full, reference):
        _same(x, y)


def test_augmentation_of_a_row_does_not_depend_on_its_batch(ds):
    small = {int(r): img for b in BatchLoader(ds, 5, seed=9, augment=True).batches(1) for r, img in zip(b.index, b.images)}
    big = {int(r): img for b in BatchLoader(ds, 32, seed=9, augment=True).batches(1) for r, img in zip(b.index, b.images)}
    for r in small:
        np.testing.assert_array_equal(small[r], big[r])
    other_epoch = next(iter(BatchLoader(ds, len(ds), seed=9, augment=True, shuffle=False).batches(2)))
    assert not np.array_equal(other_epoch.images[0], small[0])


def test_indices_subset(ds):
    rows = np.arange(len(ds))[::3]
    seen = np.concatenate([b.index for b in BatchLoader(ds, 7, indices=rows, seed=1).batches(0)])
    np.testing.assert_array_equal(np.sort(seen), rows)
    mask = np.zeros(len(ds), bool)
    mask[[2, 5]] = True
    assert sorted(np.concatenate([b.index for b in BatchLoader(ds, 4, indices=mask).batches(0)])) == [2, 5]
    with pytest.raises(ValueError, match="indices"):
        BatchLoader(ds, 4, indices=[len(ds)])
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 0)


def test_identity_augmentation_is_exact_and_parameters_stay_in_range():
    images = np.random.default_rng(0).integers(0, 256, size=(6, 1, 20, 20), dtype=np.uint8)
    identity = ChestAugment(max_shift=0.0, scale=(1.0, 1.0), max_rotation=0.0, brightness=0.0, contrast=(1.0, 1.0))
    rows = np.arange(6)
    np.testing.assert_array_equal(identity.apply(images, identity.params(0, 0, rows)), images.astype(np.float32))
    p = ChestAugment().params(1, 2, np.arange(5000))
    assert np.abs(p["angle"]).max() <= 10 and np.abs(p["shift_x"]).max() <= 0.06
    assert p["scale"].min() >= 0.9 and p["scale"].max() <= 1.1
    assert np.abs(p["angle"]).max() > 9, "the range is used"
    u = hashed_uniform(1, 2, np.arange(100000), 0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_augmentation_never_flips():
    # Bright left half, dark right half: whatever the draw, the left stays brighter (a flip would swap them).
    images = np.zeros((400, 1, 32, 32), dtype=np.uint8)
    images[:, :, :, :16] = 220
    images[:, :, :, 16:] = 30
    aug = ChestAugment()
    out = aug.apply(images, aug.params(0, 0, np.arange(400)))
    left, right = out[:, 0, 8:24, 2:12].mean(axis=(1, 2)), out[:, 0, 8:24, 20:30].mean(axis=(1, 2))
    assert (left > right + 50).all()
    # Top/bottom asymmetry survives too (no vertical flip).
    images = np.zeros((400, 1, 32, 32), dtype=np.uint8)
    images[:, :, :16, :] = 220
    out = aug.apply(images, aug.params(0, 0, np.arange(400)))
    assert (out[:, 0, 2:12, 8:24].mean(axis=(1, 2)) > out[:, 0, 20:30, 8:24].mean(axis=(1, 2)) + 50).all()


def test_study_index_groups_views(ds):
    index = StudyIndex(ds)
    assert len(index) == ds.meta["study"].nunique()
    assert sorted(np.concatenate(index.rows)) == list(range(len(ds)))
    views = ds.meta["view"].to_numpy()
    assert (views[index.frontal[index.frontal >= 0]] == "Frontal").all()
    assert (views[index.lateral[index.lateral >= 0]] == "Lateral").all()
    assert ((index.frontal >= 0) & (index.lateral >= 0)).any()
    for i, study in enumerate(index.study_ids):
        rows = np.flatnonzero(ds.meta["study"].to_numpy() == study)
        first_frontal = [r for r in rows if views[r] == "Frontal"][:1] or [-1]
        assert index.frontal[i] == first_frontal[0]
        rep = index.frontal[i] if index.frontal[i] >= 0 else index.lateral[i]
        np.testing.assert_array_equal(index.labels[i], ds.labels[rep])
        np.testing.assert_array_equal(index.tabular[i], ds.tabular[rep])
        assert index.age[i] == ds.meta["age"][rep] and index.sex[i] == ds.meta["sex"][rep]


def test_study_loader_batches_and_missing_views(ds):
    index = StudyIndex(ds)
    loader = StudyLoader(ds, 8, shuffle=False, study_index=index)
    batches = list(loader.batches(0))
    assert len(batches) == len(loader) == -(-len(index) // 8)
    entries = np.concatenate([b.study_rows for b in batches])
    np.testing.assert_array_equal(entries, np.arange(len(index)))
    for b in batches:
        assert b.frontal.shape == b.lateral.shape == (len(b.study_rows), 1, 32, 32)
        for j, e in enumerate(b.study_rows):
            for images, has, rows in ((b.frontal, b.has_frontal, index.frontal), (b.lateral, b.has_lateral, index.lateral)):
                if rows[e] < 0:
                    assert has[j] == 0 and not images[j].any()
                else:
                    assert has[j] == 1
                    np.testing.assert_array_equal(images[j], normalize(ds.images[rows[e]]))
        np.testing.assert_array_equal(b.mask, (~np.isnan(index.labels[b.study_rows])).astype(np.float32))
    shuffled = StudyLoader(ds, 8, seed=2, augment=True, workers=2)
    for x, y in zip(list(shuffled.batches(1))[2:], shuffled.batches(1, start=2)):
        _same(x, y)


def test_stopping_early_does_not_hang(ds):
    loader = BatchLoader(ds, 4, workers=2, prefetch=2, augment=True)
    gen = loader.batches(0)
    first = next(gen)
    gen.close()
    assert first.images.shape[0] == 4


def test_read_images_is_byte_identical_to_the_memory_map(ds):
    rng = np.random.default_rng(7)
    n = len(ds)
    cases = [
        np.arange(n),                                        # one run of consecutive rows
        rng.permutation(n)[:17],                             # unsorted
        np.array([5, 5, 3, 9, 5, 4, 3, n - 1, 0, 0]),        # repeats, runs 3-5, both ends
        rng.integers(0, n, 40),                              # random with repeats
        np.array([n - 1]),
        np.array([-1, -n]),                                  # negative rows, like NumPy indexing
    ]
    for rows in cases:
        got = ds.read_images(rows)
        want = np.asarray(ds.images[rows])
        assert got.dtype == np.uint8 and got.shape == want.shape == (len(rows), 1, 32, 32)
        np.testing.assert_array_equal(got, want, err_msg=f"rows {rows}")
    out = np.zeros((3, 1, 32, 32), np.uint8)
    assert ds.read_images([2, 0, 2], out=out) is out
    np.testing.assert_array_equal(out, np.asarray(ds.images[[2, 0, 2]]))
    assert ds.read_images(np.array([], np.int64)).shape == (0, 1, 32, 32)
    with pytest.raises(IndexError, match="rows"):
        ds.read_images([0, n])
    with pytest.raises(TypeError, match="rows"):
        ds.read_images([0.5])
    with pytest.raises(ValueError, match="out"):
        ds.read_images([0, 1], out=np.zeros((3, 1, 32, 32), np.uint8))


def test_read_images_spans_more_rows_than_one_preadv_call(tmp_path, monkeypatch):
    # A run longer than the iovec limit is split into several calls at the right file offsets.
    import chexcy.data.dataset as dataset_module
    monkeypatch.setattr(dataset_module, "_IOV_MAX", 3)
    fresh = PreparedDataset(prepared(size=32))
    rows = np.concatenate([np.arange(11), [20, 19, 18, 17, 30, 31]])
    np.testing.assert_array_equal(fresh.read_images(rows), np.asarray(fresh.images[rows]))
    fresh.close()
    np.testing.assert_array_equal(fresh.read_images([4]), np.asarray(fresh.images[[4]]))   # reopens


def test_read_images_reports_a_truncated_file(tmp_path):
    import shutil
    folder = tmp_path / "cut"
    shutil.copytree(prepared(size=32), folder)
    opened = PreparedDataset(folder)                         # validated here, before the cut
    with open(folder / "images.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(ValueError, match="truncated"):
        opened.read_images([len(opened) - 1])


def test_loader_batches_read_without_the_memory_map(ds, monkeypatch):
    # The loader's pixels come from read_images (positional reads), not from indexing ds.images.
    calls = []
    real = ds.read_images
    monkeypatch.setattr(ds, "read_images", lambda rows: calls.append(np.array(rows)) or real(rows))
    batch = next(iter(BatchLoader(ds, 8, shuffle=True, seed=1, workers=0).batches(0)))
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], batch.index)
    np.testing.assert_array_equal(batch.images, normalize(np.asarray(ds.images[batch.index])))
