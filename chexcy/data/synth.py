"""A synthetic CheXpert-v1.0-small: the real layout and CSV schema, chest-like pictures with learnable evidence.

`make_synthetic(out, n_train, n_valid, seed)` writes::

    out/CheXpert-v1.0-small/train.csv, valid.csv
    out/CheXpert-v1.0-small/train/patientNNNNN/studyK/viewJ_frontal.jpg | viewJ_lateral.jpg
    out/CheXpert-v1.0-small/valid/...

The tables follow the real marginals (DESIGN.md section 4): sex, age, views, AP/PA, and per observation the
rates of 1 / 0 / -1 / blank in train.csv; valid.csv is fully labelled with 0/1. Labels belong to a study
(all its views share them) and No Finding is only ever 1 or blank (a No Finding study has no positive
pathology). Every study gets a hidden *evidence strength* per observation (0 = absent), drawn from its CSV
value: positives strong-ish, uncertain weak or absent, negatives absent, blanks rarely weak. The picture
then shows each observation in proportion to its strength:

- Cardiomegaly: the heart's width relative to the thorax (cardiothoracic ratio ~0.43 normal, >0.52 enlarged);
- Pleural Effusion: bright fluid at a lung base with a meniscus that climbs laterally;
- Edema: a bilateral perihilar haze with a reticular texture;
- Consolidation: one or two dense, irregular blobs inside a lung;
- Atelectasis: a dense plate-like band in a lower lung zone, with the hemidiaphragm pulled up;
- Support Devices: bright tubes and lines, ECG lead rings, a pacemaker box;
- No Finding: none of the pathology evidence;
- and weaker cues for the rest (a wider mediastinum, mottled opacity, a nodule, an apical pneumothorax,
  pleural thickening, a faint pneumonia blob; fractures carry no picture evidence).

Anatomy, pose, scale, exposure and noise vary per image, so the evidence has to be found, not read off a
fixed pixel. All features are large enough to survive a downscale to 64x64. Output is a pure function of
`seed` (each image draws from its own generator seeded by (seed, split, image number)), whatever the
number of worker processes.
"""
import math
import os

import numpy as np

from chexcy.cpus import cores_available
from chexcy.data.schema import COLUMNS, DATASET_DIR, LABELS, format_label
from chexcy.fileio import atomic_write

# Counts of (1, -1, 0) per observation in the real train.csv (223,414 rows); the rest are blank.
TRAIN_COUNTS = {
    "No Finding": (22381, 0, 0),
    "Enlarged Cardiomediastinum": (10798, 12403, 21638),
    "Cardiomegaly": (27000, 8087, 11116),
    "Lung Opacity": (105581, 5598, 6599),
    "Lung Lesion": (9186, 1488, 1270),
    "Edema": (52246, 12984, 20726),
    "Consolidation": (14783, 27742, 28097),
    "Pneumonia": (6039, 18770, 2799),
    "Atelectasis": (33376, 33739, 1328),
    "Pneumothorax": (19448, 3145, 56341),
    "Pleural Effusion": (86187, 11628, 35396),
    "Pleural Other": (3523, 2653, 316),
    "Fracture": (9040, 642, 2512),
    "Support Devices": (116001, 1079, 6137),
}
TRAIN_ROWS = 223414
# Positive rates in valid.csv (234 images, all 0/1). Rare ones are raised a little so a small synthetic
# valid set still has positives; Consolidation is raised from 0.14 to 0.24 for a stabler AUC.
VALID_POSITIVE = {
    "No Finding": 0.16, "Enlarged Cardiomediastinum": 0.47, "Cardiomegaly": 0.29, "Lung Opacity": 0.54,
    "Lung Lesion": 0.02, "Edema": 0.19, "Consolidation": 0.24, "Pneumonia": 0.04, "Atelectasis": 0.34,
    "Pneumothorax": 0.04, "Pleural Effusion": 0.29, "Pleural Other": 0.02, "Fracture": 0.02,
    "Support Devices": 0.46,
}
MALE_FRACTION = 132636 / 223413
AP_FRACTION = 161590 / (161590 + 29420)
LATERAL_PER_STUDY = 0.17      # with ~1.05 frontals per study: ~14.5 % laterals, as in train.csv
SECOND_FRONTAL = 0.05
STUDIES_PER_PATIENT = 2.9     # 187,641 studies of 64,540 training patients
JPEG_QUALITY = 90
_SPLIT_CODE = {"train": 1, "valid": 2}
_PATHOLOGIES = [lab for lab in LABELS if lab not in ("No Finding", "Support Devices")]


# ----------------------------------------------------------------------------------------------- tables
def _strength(value, split, rng):
    """Hidden evidence strength in [0, 1] for one study's CSV value of one observation."""
    u = rng.random()
    if value == 1.0:
        return rng.uniform(0.4, 1.0) if split == "train" else rng.uniform(0.35, 1.0)
    if value == -1.0:                          # uncertain: weaker evidence, or none at all
        return rng.uniform(0.1, 0.45) if u < 0.75 else 0.0
    if value != value:                         # blank: "not mentioned", occasionally something faint
        return rng.uniform(0.1, 0.4) if u < 0.04 else 0.0
    return rng.uniform(0.05, 0.3) if (split == "valid" and u < 0.04) else 0.0


def _study_labels(split, rng):
    """One study's 14 CSV values (float, NaN = blank) in LABELS order."""
    values = {}
    if split == "train":
        p_nf = TRAIN_COUNTS["No Finding"][0] / TRAIN_ROWS
        no_finding = rng.random() < p_nf
        values["No Finding"] = 1.0 if no_finding else np.nan
        for lab in LABELS[1:]:
            pos, unc, neg = (c / TRAIN_ROWS for c in TRAIN_COUNTS[lab])
            if lab != "Support Devices":
                if no_finding:                 # no pathology: negatives or not mentioned
                    values[lab] = 0.0 if rng.random() < neg / (1 - pos - unc) else np.nan
                    continue
                pos = min(0.95, pos / (1 - p_nf))
            u = rng.random()
            values[lab] = 1.0 if u < pos else -1.0 if u < pos + unc else 0.0 if u < pos + unc + neg else np.nan
    else:
        p_nf = VALID_POSITIVE["No Finding"]
        no_finding = rng.random() < p_nf
        values["No Finding"] = float(no_finding)
        for lab in LABELS[1:]:
            p = VALID_POSITIVE[lab]
            if lab != "Support Devices":
                p = 0.0 if no_finding else min(0.95, p / (1 - p_nf))
            values[lab] = float(rng.random() < p)
    return [values[lab] for lab in LABELS]


def make_tables(n_images, split, seed, first_patient=1):
    """The CSV rows of one split and the render job of each row.

    Returns (rows, jobs): rows are lists in COLUMNS order (labels as floats, NaN = blank); jobs are tuples
    (relative path, view, height, width, strengths (14,) float, image number).
    """
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 0])
    rows, jobs = [], []
    patient = first_patient
    while len(rows) < n_images:
        sex = "Male" if rng.random() < MALE_FRACTION else "Female"
        base_age = float(np.clip(rng.normal(61, 17), 18, 90))
        n_studies = 1 if split == "valid" else int(min(rng.geometric(1 / STUDIES_PER_PATIENT), 12))
        for k in range(1, n_studies + 1):
            age = int(min(90, round(base_age + (k - 1) * rng.uniform(0, 1.5))))
            labels = _study_labels(split, rng)
            strengths = np.array([_strength(v, split, rng) for v in labels], dtype=np.float64)
            projection = "AP" if rng.random() < AP_FRACTION else "PA"
            views = ["Frontal"] * (2 if rng.random() < SECOND_FRONTAL else 1)
            if rng.random() < LATERAL_PER_STUDY:
                views.append("Lateral")
            for j, view in enumerate(views, start=1):
                if len(rows) == n_images:
                    break
                rel = f"{DATASET_DIR}/{split}/patient{patient:05d}/study{k}/view{j}_{view.lower()}.jpg"
                if view == "Frontal":
                    h, w = int(rng.integers(360, 421)), 320
                else:
                    h, w = 320, int(rng.integers(320, 401))
                rows.append([rel, sex, age, view, projection if view == "Frontal" else ""] + labels)
                jobs.append((rel, view, h, w, strengths, len(jobs)))
        patient += 1
    return rows, jobs, patient


# -------------------------------------------------------------------------------------------- pictures
def _smooth_step(d, width):
    """0 -> 1 as the signed distance d goes from -width to +width (float32 array)."""
    return np.clip(0.5 + d / (2 * width), 0.0, 1.0)


def _ellipse(X, Y, cx, cy, ax, ay, edge=0.04):
    """Soft indicator of the ellipse ((X-cx)/ax)^2 + ((Y-cy)/ay)^2 < 1, edge width as a fraction of radius."""
    r = np.sqrt(((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2)
    return _smooth_step(1.0 - r, edge)


def _segment_distance(X, Y, x0, y0, x1, y1):
    """Distance from each (X, Y) to the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy))


def _smooth_noise(rng, shape, cells):
    """Zero-mean smooth random field of `shape` built from a (cells x cells) grid, roughly in [-1, 1]."""
    from PIL import Image
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) * 0.6


def render(view, height, width, strengths, rng):
    """Draw one chest film. strengths: (14,) evidence per LABELS entry in [0, 1]. Returns uint8 (height, width).

    Anatomy, pathology and exposure draw from three independent child generators of `rng`, so the same
    seed with different strengths shows the same patient, pose and exposure with and without a finding.
    """
    anat, finding, expo = rng.spawn(3)
    from PIL import Image
    s = dict(zip(LABELS, strengths))
    h, w = height // 2, width // 2            # draw at half resolution, upscale: smooth and 4x cheaper
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (x + 0.5) / w - 0.5 - anat.normal(0, 0.02)
    y = (y + 0.5) / h - 0.5 - anat.normal(0, 0.02)
    scale = anat.uniform(0.88, 1.05)
    theta = math.radians(anat.normal(0, 2.0))
    c, sn = math.cos(theta), math.sin(theta)
    X = (c * x + sn * y) / scale               # anatomy coordinates: centre 0, image left = patient right
    Y = (-sn * x + c * y) / scale

    ctr = anat.normal(0.43, 0.03)
    if s["Cardiomegaly"] > 0:
        ctr = 0.52 + 0.15 * s["Cardiomegaly"] + finding.normal(0, 0.015)
    tissue = anat.uniform(0.38, 0.46)
    img = np.full((h, w), 0.04, np.float32)
    body = _ellipse(X, Y, 0.0, 0.06, 0.47, 0.62, 0.03)
    img += body * (tissue - 0.04)
    texture = _smooth_noise(anat, (h, w), 14) * 0.03
    lungs = _frontal(img, X, Y, s, ctr, texture, anat, finding) if view == "Frontal" else _lateral(img, X, Y, s, ctr, texture, anat, finding)

    # Uniform pathology cues that do not depend on the view's anatomy.
    if s["Lung Opacity"] > 0:                  # mottled, fine-grained opacity over part of the lungs
        mott = np.clip(_smooth_noise(finding, (h, w), 28), 0, None)
        img += lungs * mott * (0.06 + 0.10 * s["Lung Opacity"]) * _smooth_step(Y - finding.uniform(-0.2, 0.1), 0.1)
    if s["Lung Lesion"] > 0:
        cx, cy = _lung_point(view, finding)
        img += lungs * _ellipse(X, Y, cx, cy, 0.02, 0.017, 0.15) * (0.15 + 0.2 * s["Lung Lesion"])
    if s["Pneumonia"] > 0:
        cx, cy = _lung_point(view, finding)
        img += lungs * _ellipse(X, Y, cx, cy, 0.06, 0.05, 0.5) * (0.05 + 0.12 * s["Pneumonia"])

    big = Image.fromarray(img, mode="F").resize((width, height), Image.BILINEAR)
    img = np.asarray(big, dtype=np.float32).copy()
    if s["Support Devices"] > 0:
        img = _devices(img, view, s["Support Devices"], finding)
    # Exposure and detector: gamma, gain, offset, noise.
    img = np.clip(img, 0.0, 1.0) ** expo.uniform(0.8, 1.25)
    img = img * expo.uniform(0.85, 1.15) + expo.uniform(-0.05, 0.05)
    img += expo.standard_normal(img.shape, dtype=np.float32) * expo.uniform(0.01, 0.03)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _lung_point(view, rng):
    if view == "Frontal":
        return rng.choice([-1, 1]) * rng.uniform(0.1, 0.27), rng.uniform(-0.2, 0.15)
    return rng.uniform(-0.15, 0.2), rng.uniform(-0.2, 0.12)


def _frontal(img, X, Y, s, ctr, texture, anat, finding):
    """Frontal anatomy and pathology drawn into img (h, w) in place; returns the soft lung mask."""
    lungs = np.zeros_like(img)
    lung_value = anat.uniform(0.08, 0.14)
    domes = {}
    for side in (-1, 1):
        lx = side * 0.19
        lift = 0.03 * s["Atelectasis"] if side == -1 else 0.0   # volume loss pulls the right dome up
        dome = (0.20 if side == -1 else 0.22) - lift + 0.10 * ((X - lx) / 0.17) ** 2   # right dome sits higher
        domes[side] = dome
        mask = _ellipse(X, Y, lx, -0.04, 0.155, 0.30, 0.05) * _smooth_step(dome - Y, 0.01)
        lungs = np.maximum(lungs, mask)
    ribs = np.clip((np.cos(2 * np.pi * (Y + 0.9 * X * X) / 0.075) - 0.2) * 1.5, 0, 1) * 0.07
    img += lungs * (lung_value + ribs + texture - img)
    below = _smooth_step(Y - np.minimum(domes[-1], domes[1]), 0.01) * _ellipse(X, Y, 0.0, 0.06, 0.47, 0.62)
    img += below * 0.08
    # Mediastinum (wider with an enlarged cardiomediastinum) and heart.
    half = 0.055 + 0.045 * s["Enlarged Cardiomediastinum"]
    med = _smooth_step(half - np.abs(X - 0.005), 0.01) * _smooth_step(0.2 - Y, 0.02) * _smooth_step(Y + 0.42, 0.02)
    dense = anat.uniform(0.55, 0.65)
    img += med * (dense - img)
    # An enlarged heart is wider and, less so, taller: more of the lower chest turns dense.
    heart = _ellipse(X, Y, 0.04, 0.14, ctr * 0.36, 0.14 * (1 + 0.8 * (ctr - 0.43)), 0.05)
    img += heart * (dense - img)
    for side in (-1, 1):                       # clavicles
        d = _segment_distance(X, Y, side * 0.04, -0.36, side * 0.33, -0.42)
        img += _smooth_step(0.012 - d, 0.004) * 0.12

    if s["Pleural Effusion"] > 0:
        st = s["Pleural Effusion"]
        u = finding.random()
        sides = (-1, 1) if u < 0.5 else ((-1,) if u < 0.75 else (1,))
        for side in sides:
            hgt = (0.04 + 0.14 * st) * finding.uniform(0.85, 1.15)
            lateral = np.clip((X - side * 0.19) * side / 0.155, -1, 1)
            top = domes[side] - hgt * (0.7 + 0.5 * lateral)
            fluid = _smooth_step(Y - top, 0.012) * _ellipse(X, Y, side * 0.19, -0.02, 0.16, 0.33, 0.05)
            fluid *= _smooth_step(side * X, 0.01)          # stay on this side of the midline
            img += fluid * (finding.uniform(0.5, 0.58) - img)
    if s["Edema"] > 0:
        st = s["Edema"]
        amp = 0.08 + 0.22 * st
        wing = np.exp(-((np.abs(X) - 0.09) / 0.17) ** 2 - ((Y - 0.0) / 0.28) ** 2)
        retic = 1.0 + 0.5 * _smooth_noise(finding, img.shape, 24)
        img += lungs * wing * retic * amp
    if s["Consolidation"] > 0:
        st = s["Consolidation"]
        for _ in range(1 if finding.random() < 0.7 else 2):
            cx, cy = _lung_point("Frontal", finding)
            r = finding.uniform(0.07, 0.11)
            blob = _ellipse(X, Y, cx, cy, r, r * finding.uniform(0.8, 1.3), 0.3)
            blob *= 1.0 + 0.6 * _smooth_noise(finding, img.shape, 20)
            img += lungs * np.clip(blob, 0, 1.3) * (0.25 + 0.35 * st)
    if s["Atelectasis"] > 0:
        st = s["Atelectasis"]
        side = -1 if finding.random() < 0.6 else 1
        cx, cy = side * finding.uniform(0.1, 0.24), finding.uniform(0.04, 0.15)
        ang = math.radians(finding.uniform(-25, 25))
        half_len = finding.uniform(0.07, 0.11)
        d = _segment_distance(X, Y, cx - half_len * math.cos(ang), cy - half_len * math.sin(ang),
                              cx + half_len * math.cos(ang), cy + half_len * math.sin(ang))
        img += lungs * _smooth_step(0.012 + 0.012 * st - d, 0.006) * (0.18 + 0.3 * st)
    if s["Pneumothorax"] > 0:
        side = finding.choice([-1, 1])
        lateral = (X - side * 0.19) * side / 0.155
        rim = _smooth_step(lateral - (0.85 - 0.35 * s["Pneumothorax"]), 0.03) * _smooth_step(-0.02 - Y, 0.05)
        img -= lungs * rim * (img - 0.03) * 0.9
    if s["Pleural Other"] > 0:
        for side in (-1, 1):
            lateral = (X - side * 0.19) * side / 0.155
            img += lungs * _smooth_step(lateral - 0.88, 0.03) * 0.12 * s["Pleural Other"]
    return lungs


def _lateral(img, X, Y, s, ctr, texture, anat, finding):
    """Lateral anatomy (patient facing image left) and pathology drawn into img; returns the lung mask."""
    dome = 0.22 + 0.08 * ((X - 0.02) / 0.3) ** 2 - 0.03 * s["Atelectasis"]
    lungs = _ellipse(X, Y, 0.02, -0.05, 0.3, 0.32, 0.05) * _smooth_step(dome - Y, 0.01)
    img += lungs * (anat.uniform(0.1, 0.16) + texture - img)
    dense = anat.uniform(0.55, 0.65)
    heart = _ellipse(X, Y, -0.13, 0.12, 0.12 * ctr / 0.43, 0.15 * (1 + 0.8 * (ctr - 0.43)), 0.06)
    img += heart * (dense - img)
    spine = _smooth_step(0.04 - np.abs(X - 0.34), 0.01) * _ellipse(X, Y, 0.0, 0.06, 0.47, 0.62)
    discs = 0.85 + 0.15 * np.cos(2 * np.pi * Y / 0.07)
    img += spine * (dense * discs - img)
    if s["Pleural Effusion"] > 0:
        hgt = 0.04 + 0.12 * s["Pleural Effusion"]
        top = dome - hgt * (0.5 + 0.8 * np.clip((X - 0.02) / 0.3, 0, 1))
        img += lungs * _smooth_step(Y - top, 0.012) * (0.54 - img)
    if s["Edema"] > 0:
        wing = np.exp(-((X + 0.02) / 0.2) ** 2 - (Y / 0.25) ** 2)
        img += lungs * wing * (1.0 + 0.5 * _smooth_noise(finding, img.shape, 24)) * (0.08 + 0.22 * s["Edema"])
    if s["Consolidation"] > 0:
        cx, cy = _lung_point("Lateral", finding)
        r = finding.uniform(0.05, 0.09)
        img += lungs * _ellipse(X, Y, cx, cy, r, r, 0.3) * (0.25 + 0.35 * s["Consolidation"])
    if s["Atelectasis"] > 0:
        cy = finding.uniform(0.02, 0.14)
        d = _segment_distance(X, Y, -0.12, cy + 0.03, 0.15, cy - 0.03)
        img += lungs * _smooth_step(0.012 + 0.012 * s["Atelectasis"] - d, 0.006) * (0.18 + 0.3 * s["Atelectasis"])
    return lungs


def _devices(img, view, strength, rng):
    """Draw tubes, wires, ECG leads or a pacemaker onto the full-size float image; returns it."""
    from PIL import Image, ImageDraw
    height, width = img.shape
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    n_items = 1 + int(strength > 0.55) + int(strength > 0.8)
    kinds = rng.permutation(["tube", "line", "leads", "pacer"])[:n_items]
    bright = int(150 + 100 * strength)
    lw = max(2, int(round(2 + 3 * strength)))

    def px(xn, yn):                            # normalised (centre 0) -> pixel coordinates
        return ((xn + 0.5) * width, (yn + 0.5) * height)

    for kind in kinds:
        if kind == "tube":                     # endotracheal / nasogastric tube down the midline
            x0 = rng.normal(0.0, 0.015)
            end = rng.uniform(-0.15, 0.35)
            pts = [px(x0 + 0.01 * math.sin(t * 3), -0.5 + t * (end + 0.5)) for t in np.linspace(0, 1, 8)]
            draw.line(pts, fill=bright, width=lw)
        elif kind == "line":                   # central venous line from a subclavian vein
            side = rng.choice([-1, 1])
            pts = [px(side * (0.32 - 0.3 * t) + rng.normal(0, 0.003), -0.4 + 0.3 * t * t) for t in np.linspace(0, 1, 10)]
            draw.line(pts, fill=bright, width=lw)
        elif kind == "leads":                  # ECG electrodes
            for _ in range(int(rng.integers(2, 5))):
                cx, cy = px(rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.3))
                r = rng.uniform(6, 10)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=bright, width=lw)
        else:                                  # pacemaker box with its lead to the heart
            cx, cy = px(rng.uniform(0.18, 0.32), rng.uniform(-0.38, -0.3))
            draw.rectangle([cx - 16, cy - 11, cx + 16, cy + 11], fill=bright)
            draw.line([(cx, cy), px(0.0, -0.15), px(0.06, 0.1)], fill=bright, width=lw)
    dev = np.asarray(canvas, dtype=np.float32) / 255.0
    return img + dev * (1.0 - img)


def _render_job(job_and_seed):
    (rel, view, h, w, strengths, number), out_root, seed, split = job_and_seed
    from PIL import Image
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 1, number])
    pixels = render(view, h, w, strengths, rng)
    path = os.path.join(out_root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(pixels, mode="L")
    atomic_write(path, lambda f: image.save(f, format="JPEG", quality=JPEG_QUALITY), durable=False)
    return rel


def _write_csv(rows, path):
    import csv

    def write(f):
        out = csv.writer(f, lineterminator="\n")
        out.writerow(COLUMNS)
        for row in rows:
            out.writerow(row[:2] + [str(row[2])] + row[3:5] + [format_label(v) for v in row[5:]])
    atomic_write(path, write, mode="w", newline="")


def make_synthetic(out, n_train=2000, n_valid=300, seed=0, workers=None, progress=None):
    """Write a synthetic CheXpert-v1.0-small under `out`; returns the path of its train.csv.

    workers: processes rendering images (default: the CPUs available, at most 8); the output does not
    depend on it. progress: optional callable(done, total) called as images are written.
    """
    if n_train < 1 or n_valid < 1:
        raise ValueError(f"synth: need at least one image per split (n_train={n_train}, n_valid={n_valid})")
    out = os.fspath(out)
    train_rows, train_jobs, next_patient = make_tables(n_train, "train", seed)
    valid_rows, valid_jobs, _ = make_tables(n_valid, "valid", seed, first_patient=next_patient)
    tasks = [(job, out, seed, "train") for job in train_jobs] + [(job, out, seed, "valid") for job in valid_jobs]
    if workers is None:
        workers = min(8, cores_available())
    total = len(tasks)
    if workers <= 1:
        for i, task in enumerate(tasks):
            _render_job(task)
            if progress:
                progress(i + 1, total)
    else:
        import multiprocessing as mp
        with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
            for i, _ in enumerate(pool.imap_unordered(_render_job, tasks, chunksize=16)):
                if progress:
                    progress(i + 1, total)
    base = os.path.join(out, DATASET_DIR)
    # The CSVs are written last: a folder with a train.csv has all its images.
    _write_csv(train_rows, os.path.join(base, "train.csv"))
    _write_csv(valid_rows, os.path.join(base, "valid.csv"))
    return os.path.join(base, "train.csv")
