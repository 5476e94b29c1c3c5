"""The CheXpert CSV schema: column names, label names, allowed values. The one source of truth.

A CheXpert CSV (``train.csv`` or ``valid.csv`` of CheXpert-v1.0-small) has 19 columns, in this order:
``Path, Sex, Age, Frontal/Lateral, AP/PA`` and the 14 observations of :data:`LABELS`. Label cells hold
1.0 (positive), 0.0 (negative), -1.0 (uncertain) or are blank (not mentioned).
"""
import os
import re

import numpy as np

LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
NUM_CLASSES = len(LABELS)

COMPETITION_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
COLUMNS = META_COLUMNS + LABELS

DATASET_DIR = "CheXpert-v1.0-small"        # the first component of every Path
SEX_VALUES = ("Male", "Female", "Unknown")
VIEW_VALUES = ("Frontal", "Lateral")
PROJECTION_VALUES = ("AP", "PA", "LL", "RL")  # blank (laterals) is allowed too
LABEL_VALUES = (1.0, 0.0, -1.0)              # and NaN = blank
AGE_RANGE = (0, 90)                          # CheXpert reports ages above 90 as 90
AGE_LIMIT = 150                              # ages above this are errors, not old patients
# The per-image columns of a prepared folder's meta.csv (the 14 raw label values follow them).
PREPARED_META_COLUMNS = ("path", "csv_row", "patient", "study", "view", "ap_pa", "sex", "age")

_PATH_RE = re.compile(r"(?:^|/)(?P<split>[^/]+)/(?P<patient>patient\d+)/(?P<study>study\d+)/(?P<file>[^/]+)$")
# MIMIC-CXR's layout: files/p10/p10000032/s50414267/<dicom id>.dcm (patient group, patient, study).
_MIMIC_PATH_RE = re.compile(r"(?:^|/)(?P<split>[^/]+)/p\d\d/(?P<patient>p\d+)/(?P<study>s\d+)/(?P<file>[^/]+)$")


def label_index(name):
    """Index of observation `name` (case-insensitive) in :data:`LABELS`; ValueError listing valid names."""
    for i, label in enumerate(LABELS):
        if label.lower() == str(name).strip().lower():
            return i
    raise ValueError(f"unknown observation {name!r}; valid names: {', '.join(LABELS)}")


def canonical(value, allowed, what):
    """`value` spelled as in `allowed` (case-insensitive match); ValueError naming `what` otherwise."""
    for a in allowed:
        if a.lower() == str(value).strip().lower():
            return a
    raise ValueError(f"{what}: unknown value {value!r}; expected one of {', '.join(allowed)}")


def parse_path(path):
    """Split a CheXpert Path into (split, patient, study id, file name).

    The study id is ``"<patient>/<study>"`` (e.g. ``"patient00001/study1"``), unique over a download.
    MIMIC-CXR's paths (``files/p10/p10000032/s50414267/<id>.dcm``) are read the same way: split "files",
    patient "p10000032", study id "p10000032/s50414267".
    """
    text = str(path).replace(os.sep, "/")
    m = _PATH_RE.search(text) or _MIMIC_PATH_RE.search(text)
    if m is None:
        raise ValueError(f"Path {path!r} does not look like .../<split>/patientNNNNN/studyK/<file> (CheXpert) "
                         f"or .../files/pNN/pNNNNNNNN/sNNNNNNNN/<file> (MIMIC-CXR)")
    return m["split"], m["patient"], f"{m['patient']}/{m['study']}", m["file"]


def lines_where(bad):
    """Boolean (N,) over the rows of a CSV file -> "line(s) 3, 7 and 2 more" (1-based file lines, after the
    header line), for error messages."""
    idx = np.flatnonzero(np.asarray(bad))
    shown = ", ".join(str(i + 2) for i in idx[:5])
    return f"line(s) {shown}" + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")


def read_csv(csv_path):
    """Read and validate a CheXpert CSV; returns a pandas DataFrame with the 19 columns of :data:`COLUMNS`.

    Sex, Frontal/Lateral and AP/PA are spelled canonically (matching is case-insensitive), AP/PA blank is
    "", Age is float64, label columns are float64 with NaN for blank. Raises ValueError naming the file,
    the column and the first offending rows for: missing columns (all listed), an unknown Sex / view /
    projection value, a non-numeric or out-of-range Age, a label value other than 1, 0, -1 or blank,
    a malformed Path.
    """
    import pandas as pd

    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file {csv_path!r} does not exist")
    try:
        # Text columns stay strings; label columns are parsed as numbers straight away (a blank is NaN), so
        # a 223,414-row CSV costs ~60 MB rather than the ~300 MB of 19 columns of Python strings.
        df = pd.read_csv(csv_path, dtype={c: str for c in META_COLUMNS}, keep_default_na=False,
                         na_values={label: [""] for label in LABELS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv_path}: not a readable CSV ({exc})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing required column(s): {', '.join(missing)} "
                         f"(found: {', '.join(df.columns)})")
    df = df.loc[:, list(COLUMNS)].copy()

    def canonicalise(column, allowed, blank_ok=False):
        lookup = {a.lower(): a for a in allowed}
        if blank_ok:
            lookup[""] = ""
        raw = df[column].str.strip()
        out = raw.str.lower().map(lookup)
        bad = out.isna()
        if bad.any():
            values = sorted(set(raw[bad]))[:5]
            raise ValueError(f"{csv_path}: column {column!r} has unknown value(s) {values} at {lines_where(bad)}; "
                             f"expected one of {', '.join(allowed)}" + (" or blank" if blank_ok else ""))
        df[column] = out

    canonicalise("Sex", SEX_VALUES)
    canonicalise("Frontal/Lateral", VIEW_VALUES)
    canonicalise("AP/PA", PROJECTION_VALUES, blank_ok=True)

    age = pd.to_numeric(df["Age"].str.strip(), errors="coerce")
    bad = age.isna()
    if bad.any():
        raise ValueError(f"{csv_path}: column 'Age' has non-numeric value(s) "
                         f"{sorted(set(df['Age'][bad]))[:5]} at {lines_where(bad)}")
    bad = (age < AGE_RANGE[0]) | (age > AGE_LIMIT)
    if bad.any():
        raise ValueError(f"{csv_path}: column 'Age' out of range at {lines_where(bad)}")
    df["Age"] = age.astype(np.float64)

    for label in LABELS:
        column = df[label]
        if column.dtype.kind in "fiu":                 # parsed as numbers already: check the value set
            values = column.astype(np.float64)
            bad = ~(values.isin(LABEL_VALUES) | values.isna())
            shown = values
        else:                                          # some cell is not a number: find which
            shown = column.astype(str).str.strip()
            values = pd.to_numeric(shown.where(~column.isna() & (shown != ""), "nan"), errors="coerce")
            bad = (values.isna() & ~column.isna() & (shown != "")) | ~(values.isin(LABEL_VALUES) | values.isna())
        if bad.any():
            raise ValueError(f"{csv_path}: column {label!r} has value(s) {sorted(set(shown[bad].astype(str)))[:5]} "
                             f"at {lines_where(bad)}; expected 1, 0, -1 or blank")
        df[label] = values.astype(np.float64)
    for column in ("Sex", "Frontal/Lateral", "AP/PA"):  # few distinct values: categories are compact
        df[column] = df[column].astype("category")

    paths = df["Path"].str.strip()
    bad = ~paths.map(lambda p: (_PATH_RE.search(p) or _MIMIC_PATH_RE.search(p)) is not None).astype(bool)
    if bad.any():
        raise ValueError(f"{csv_path}: column 'Path' has malformed value(s) at {lines_where(bad)} "
                         f"(expected {DATASET_DIR}/<split>/patientNNNNN/studyK/viewJ_<view>.jpg, or MIMIC-CXR's "
                         f"files/pNN/pNNNNNNNN/sNNNNNNNN/<id>.dcm)")
    df["Path"] = paths
    return df.reset_index(drop=True)


def format_label(value):
    """One label cell as the CSV writes it: '1.0', '0.0', '-1.0' or '' (blank)."""
    return "" if value != value else f"{float(value):.1f}"
