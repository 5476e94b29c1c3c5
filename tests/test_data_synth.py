"""`chexcy synth`: the real layout and schema, realistic tables, deterministic, pictures with evidence."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from chexcy.data import COLUMNS, COMPETITION_TASKS, LABELS
from chexcy.data.schema import read_csv
from chexcy.data.synth import TRAIN_COUNTS, TRAIN_ROWS, make_synthetic, make_tables, render

from data_fixtures import fresh_dir, synthetic_download, train_csv, valid_csv


def test_layout_columns_and_paths_are_those_of_the_real_download():
    root = synthetic_download()
    for csv_path, split in ((train_csv(), "train"), (valid_csv(), "valid")):
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f))
        assert tuple(header) == COLUMNS, f"{split}.csv header {header}"
        df = read_csv(csv_path)                       # the schema validator accepts it
        assert df["Path"].str.match(rf"^CheXpert-v1\.0-small/{split}/patient\d{{5}}/study\d+/view\d+_(frontal|lateral)\.jpg$").all()
        for rel, view in zip(df["Path"], df["Frontal/Lateral"]):
            assert os.path.isfile(os.path.join(root, rel)), rel
            assert rel.endswith(f"_{view.lower()}.jpg")
    df = read_csv(train_csv())
    for rel, view in list(zip(df["Path"], df["Frontal/Lateral"]))[:40]:
        with Image.open(os.path.join(root, rel)) as img:
            assert img.format == "JPEG" and img.mode == "L", (rel, img.format, img.mode)
            w, h = img.size
            assert min(w, h) == 320, (rel, img.size)
            if view == "Frontal":
                assert h > w, f"frontal {rel} should be taller than wide, got {img.size}"


def test_patients_studies_views_and_label_values_look_like_chexpert():
    df = read_csv(train_csv())
    study = df["Path"].str.extract(r"(patient\d+/study\d+)")[0]
    patient = df["Path"].str.extract(r"(patient\d+)")[0]
    assert study.groupby(patient).nunique().max() >= 2, "some patient should have several studies"
    views_per_study = df.groupby(study)["Frontal/Lateral"].agg(set)
    assert any(v == {"Frontal", "Lateral"} for v in views_per_study), "some study should have both views"
    assert (df.loc[df["Frontal/Lateral"] == "Lateral", "AP/PA"] == "").all()
    assert set(df.loc[df["Frontal/Lateral"] == "Frontal", "AP/PA"]) <= {"AP", "PA", "LL", "RL"}
    assert set(df["Sex"]) <= {"Male", "Female", "Unknown"}
    assert df["Age"].between(0, 90).all()
    # Labels belong to the study: all its views carry the same values.
    labels = df[list(LABELS)].fillna(9.0)
    assert (labels.groupby(study).nunique() == 1).all().all()
    assert set(df["No Finding"].dropna()) == {1.0}, "No Finding is only ever 1 or blank"
    no_finding = df["No Finding"] == 1.0
    pathologies = [lab for lab in LABELS if lab not in ("No Finding", "Support Devices")]
    assert not df.loc[no_finding, pathologies].isin([1.0, -1.0]).any().any()
    valid = read_csv(valid_csv())
    assert valid[list(LABELS)].isin([0.0, 1.0]).all().all(), "valid.csv is fully labelled with 0/1"
    assert set(valid["Path"].str.extract(r"(patient\d+)")[0]).isdisjoint(set(patient))


def test_tables_follow_the_real_marginals():
    rows, jobs, _ = make_tables(20000, "train", seed=3)
    values = np.array([r[5:] for r in rows], dtype=np.float64)
    for j, label in enumerate(LABELS):
        for k, v in enumerate((1.0, -1.0, 0.0)):
            want = TRAIN_COUNTS[label][k] / TRAIN_ROWS
            got = np.mean(values[:, j] == v)
            assert abs(got - want) < 0.03, f"{label} rate of {v}: {got:.3f}, real {want:.3f}"
    sex = np.array([r[1] for r in rows])
    view = np.array([r[3] for r in rows])
    assert abs(np.mean(sex == "Male") - 0.594) < 0.02
    assert abs(np.mean(view == "Lateral") - 32387 / 223414) < 0.02
    frontal_proj = np.array([r[4] for r in rows])[view == "Frontal"]
    assert abs(np.mean(frontal_proj == "AP") - 0.846) < 0.02
    assert len({j[0] for j in jobs}) == len(jobs)


def test_valid_split_has_enough_positives_for_a_stable_auc():
    rows, _, _ = make_tables(300, "valid", seed=0)
    values = np.array([r[5:] for r in rows], dtype=np.float64)
    for task in COMPETITION_TASKS:
        rate = values[:, LABELS.index(task)].mean()
        assert rate >= 0.15, f"{task}: only {rate:.2f} positives in valid"


def test_same_seed_same_bytes_other_seed_other_pictures():
    a, b, c = fresh_dir("synth-a"), fresh_dir("synth-b"), fresh_dir("synth-c")
    make_synthetic(a, n_train=10, n_valid=3, seed=11, workers=1)
    make_synthetic(b, n_train=10, n_valid=3, seed=11, workers=2)     # worker count must not matter
    make_synthetic(c, n_train=10, n_valid=3, seed=12, workers=1)
    base = "CheXpert-v1.0-small"
    for name in ("train.csv", "valid.csv"):
        with open(os.path.join(a, base, name), "rb") as fa, open(os.path.join(b, base, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    rel = read_csv(os.path.join(a, base, "train.csv"))["Path"]
    for p in rel:
        with open(os.path.join(a, p), "rb") as fa, open(os.path.join(b, p), "rb") as fb:
            assert fa.read() == fb.read(), p
    with open(os.path.join(c, base, "train.csv"), "rb") as fc, open(os.path.join(a, base, "train.csv"), "rb") as fa:
        assert fc.read() != fa.read(), "another seed should give another table"
    first = rel[0]
    pa = _at64(np.asarray(Image.open(os.path.join(a, first))))[:64]
    pc = _at64(np.asarray(Image.open(os.path.join(c, first))))[:64]
    assert np.abs(pa - pc).mean() > 1.0, "another seed should give other pictures"


def _at64(pixels):
    img = Image.fromarray(pixels)
    return np.asarray(img.resize((64, round(64 * img.height / img.width)), Image.BOX), np.float32)


# (observation, rows, columns) of a 64-wide frontal where the evidence must brighten the picture.
EVIDENCE_REGIONS = [
    ("Cardiomegaly", (0.55, 0.78), (0.15, 0.85)),
    ("Pleural Effusion", (0.6, 0.8), (0.1, 0.9)),
    ("Edema", (0.3, 0.65), (0.15, 0.85)),
    ("Consolidation", (0.2, 0.75), (0.1, 0.9)),
    ("Atelectasis", (0.45, 0.78), (0.1, 0.9)),
    ("Support Devices", (0.0, 1.0), (0.0, 1.0)),
]


@pytest.mark.parametrize("label,rows,cols", EVIDENCE_REGIONS, ids=[r[0] for r in EVIDENCE_REGIONS])
def test_evidence_survives_64px_and_uncertain_evidence_is_weaker(label, rows, cols):
    gains = {0.3: [], 1.0: []}
    for seed in range(6):
        none = _at64(render("Frontal", 390, 320, np.zeros(len(LABELS)), np.random.default_rng(seed)))
        h, w = none.shape
        region = (slice(int(rows[0] * h), int(rows[1] * h)), slice(int(cols[0] * w), int(cols[1] * w)))
        for strength in gains:
            s = np.zeros(len(LABELS))
            s[LABELS.index(label)] = strength
            shown = _at64(render("Frontal", 390, 320, s, np.random.default_rng(seed)))
            gains[strength].append(np.abs(shown - none)[region].mean())
    strong, weak = np.median(gains[1.0]), np.median(gains[0.3])
    assert strong > 2.0, f"{label}: strong evidence changes the 64px region by only {strong:.2f} grey levels"
    assert weak < strong, f"{label}: weak evidence ({weak:.2f}) should show less than strong ({strong:.2f})"


def test_no_finding_pictures_carry_no_pathology_evidence():
    rows, jobs, _ = make_tables(3000, "train", seed=5)
    for row, job in zip(rows, jobs):
        if row[5] == 1.0:                                  # No Finding
            strengths = dict(zip(LABELS, job[4]))
            assert all(strengths[lab] == 0 or row[5 + LABELS.index(lab)] != row[5 + LABELS.index(lab)]
                       for lab in LABELS if lab not in ("No Finding", "Support Devices")), row


def test_synthetic_files_go_through_atomic_write(tmp_path, monkeypatch):
    # One writer for every file chexcy writes: the images (durable=False: cheap to make again, no fsync)
    # and the CSVs (durable) all pass through chexcy.fileio.atomic_write, and no temporary is left.
    from chexcy import fileio
    from chexcy.data import synth
    calls = []
    real = fileio.atomic_write

    def spy(path, writer, *args, **kwargs):
        calls.append((os.path.basename(path), kwargs.get("durable", True)))
        return real(path, writer, *args, **kwargs)

    monkeypatch.setattr(synth, "atomic_write", spy)
    csv_path = synth.make_synthetic(tmp_path, n_train=6, n_valid=2, seed=3, workers=1)
    jpegs = [p for p in tmp_path.rglob("*.jpg")]
    assert sorted(name for name, _ in calls if name.endswith(".jpg")) == sorted(p.name for p in jpegs)
    assert all(not durable for name, durable in calls if name.endswith(".jpg"))
    assert {"train.csv", "valid.csv"} <= {name for name, durable in calls if durable}
    assert os.path.exists(csv_path)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
