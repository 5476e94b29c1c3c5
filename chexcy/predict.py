"""`chexcy predict`: 14 probabilities per image file, and Grad-CAM heat maps of where the model looked.

Preprocessing is exactly training's: `chexcy.data.load_image(path, size)` (the function `chexcy prepare`
uses) then `chexcy.data.normalize`. A multiview checkpoint scores each file as a study with that one
image as its frontal view and unknown age and sex.

Grad-CAM (Selvaraju et al. 2017): with A (C, h, w) the last convolutional feature map and y the logit of the
chosen observation, the weight of channel c is the spatial mean of dy/dA_c, and the map is
ReLU(sum_c weight_c * A_c), upsampled to the image and scaled to [0, 1]. The heat map PNG shows the map
over the image the model saw (the same centred square), at the source file's resolution (its shorter
side, kept within [256, 1024] px) rather than the model's input size, tinted blue-to-red where the map is
high, under a title (file, observation, probability) and beside a colour bar. Its name keeps CheXpert's
patient and study folders (patient00001_study1_view1_frontal_edema_gradcam.png), so views of different
patients never share a name; two inputs that still would get _2, _3, ... rather than overwrite.
"""
import csv
import io
import json
import os
import re
import sys

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")


def collect_inputs(inputs):
    """Paths given on the command line -> (files, problems, roots): folders are searched recursively for
    JPEG/PNG/DICOM files (sorted); a named file is kept whatever its extension (load_image judges it). problems
    lists (path, reason) for paths that do not exist or folders without images; roots maps each file
    found in a folder to that folder."""
    files, problems, roots = [], [], {}
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for folder, dirs, names in os.walk(item):
                dirs.sort()
                found += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                problems.append((item, "folder holds no .jpg/.jpeg/.png/.dcm file"))
            files += found
            roots.update((f, item) for f in found)
        elif os.path.exists(item):
            files.append(item)
        else:
            problems.append((item, "no such file or folder"))
    return files, problems, roots


def first_nonfinite_weight(ckpt):
    """(name, count, size) of the first parameter or buffer of checkpoint `ckpt` holding NaN or inf, in
    the model's order, or None when every value is finite. A run that diverged can leave such weights
    behind; they make every probability NaN."""
    for name, value in ckpt.model_state.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(value)))
            if bad:
                return name, bad, value.size
    return None


def check_weights_finite(ckpt):
    """Raise CheckpointError naming the checkpoint and its first non-finite parameter, if it has one."""
    from chexcy.checkpoint import CheckpointError
    found = first_nonfinite_weight(ckpt)
    if found is not None:
        name, bad, size = found
        raise CheckpointError(ckpt.path, f"holds non-finite weights ({name}: {bad} of {size} "
                              f"values are NaN or inf), so every probability would be NaN; the run that wrote "
                              f"it diverged: use a checkpoint saved before that, or train again (e.g. with a lower --lr)")


def colormap(t):
    """t float (...,) in [0, 1] -> uint8 (..., 3): a blue-cyan-yellow-red scale (piecewise linear)."""
    t = np.clip(t, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * t - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * t - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * t - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def grad_cam(model, x, label_index):
    """Grad-CAM maps of `model` for images x (N, 1, S, S) float32 and observation `label_index`.

    Returns (probs float64 (N, 14), cams float32 (N, S, S) in [0, 1]). The model stays in eval mode.
    """
    from PIL import Image

    from chexcy.nn import sigmoid
    model.eval()
    logits, feature_map = model.forward_cam(x)
    dlogits = np.zeros_like(logits)
    dlogits[:, label_index] = 1.0
    dfeature = model.backward_cam(dlogits)                       # (N, C, h, w)
    weights = dfeature.mean(axis=(2, 3))                        # (N, C)
    cams_small = np.maximum(np.einsum("nc,nchw->nhw", weights, feature_map), 0)
    cams = np.zeros((x.shape[0], x.shape[-2], x.shape[-1]), np.float32)
    for i, cam in enumerate(cams_small):
        top = float(cam.max())
        if top > 0:
            img = Image.fromarray((cam / top).astype(np.float32), mode="F")
            cams[i] = np.asarray(img.resize((x.shape[-1], x.shape[-2]), Image.BILINEAR))
    return sigmoid(logits.astype(np.float64)), np.clip(cams, 0, 1)


HEATMAP_SIDE = (256, 1024)        # the heat map's image side: the source's shorter side, clamped to this


def overlay(image_u8, cam, alpha=0.55):
    """Grayscale uint8 (D, D) + map float (S, S) in [0, 1] -> RGB uint8 (D, D, 3): the map, upsampled
    bilinearly to D x D, tints the image with colormap()."""
    from PIL import Image
    side = image_u8.shape[0]
    if cam.shape != image_u8.shape:
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((side, side), Image.BILINEAR))
    cam = np.clip(cam, 0.0, 1.0)
    gray = np.repeat(image_u8[..., None].astype(np.float32), 3, axis=-1)
    weight = (alpha * cam)[..., None]
    rgb = (1 - weight) * gray + weight * colormap(cam).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)          # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()                   # Pillow's small bitmap font


def _fit(draw, text, font, width):
    """text, shortened from the left with '...' until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 4 and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


def render_heatmap(image_u8, cam, title, subtitle):
    """The heat map picture: grayscale uint8 (D, D) image, map (S, S) in [0, 1], two title lines
    -> PIL RGB image of about (D + 90) x (D + 60): the overlay, the title above, a colour bar at the right."""
    from PIL import Image, ImageDraw
    side = image_u8.shape[0]
    text = max(12, side // 28)
    font, small = _font(text), _font(max(10, text - 2))
    top, bar_w, right = 2 * text + 16, max(12, side // 24), max(12, side // 24) + 4 * text
    canvas = Image.new("RGB", (side + 12 + right, top + side + 8), "white")
    canvas.paste(Image.fromarray(overlay(image_u8, cam), mode="RGB"), (0, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 4), _fit(draw, title, font, canvas.width - 4), fill="black", font=font)
    draw.text((2, 8 + text), _fit(draw, subtitle, small, canvas.width - 4), fill="black", font=small)
    # Colour bar: 1 (strongest evidence) at the top, 0 at the bottom, as the overlay blends it.
    x0 = side + 12
    ramp = np.linspace(1.0, 0.0, side)[:, None].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(colormap(ramp), mode="RGB"), (x0, top))
    draw.rectangle((x0, top, x0 + bar_w - 1, top + side - 1), outline="black")
    for value in (1.0, 0.5, 0.0):
        y = top + round((1.0 - value) * (side - 1))
        draw.line((x0 + bar_w, y, x0 + bar_w + 4, y), fill="black")
        draw.text((x0 + bar_w + 6, min(max(y - text // 2, top), top + side - text)), f"{value:g}",
                  fill="black", font=small)
    return canvas


def _display_side(path):
    """The heat map's side for image file `path`: its shorter side, clamped to HEATMAP_SIDE."""
    from PIL import Image
    with Image.open(path) as img:
        short = min(img.size)
    return int(min(max(short, HEATMAP_SIDE[0]), HEATMAP_SIDE[1]))


_CHEXPERT_FOLDER = re.compile(r"^(patient\d+|study\d+)$")


def _heatmap_name(path, observation, used, roots):
    """<path relative to the folder given on the command line (or the file name), with the CheXpert
    patientN/studyM folders above it, separators as '_'>_<observation>_gradcam.png; _2, _3, ... when
    another input of this run already has that name."""
    root = roots.get(path) if roots else None
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    parts = os.path.splitext(rel)[0].replace("\\", "/").split("/")
    above = os.path.abspath(path).split(os.sep)[:-len(parts)]
    while above and _CHEXPERT_FOLDER.match(above[-1]):    # patient/study folders the user's path left out
        parts.insert(0, above.pop())
    stem = "_".join(p for p in parts if p not in ("", ".", ".."))
    slug = observation.lower().replace(" ", "-")
    name = f"{stem}_{slug}_gradcam.png"
    k = 2
    while name in used:
        name = f"{stem}_{slug}_gradcam_{k}.png"
        k += 1
    used.add(name)
    return name


def predict_files(checkpoint, files, batch_size=32, heatmap_dir=None, observation=None, errors=None, roots=None):
    """Score image files. Returns a list of (path, probs float64 (14,), heatmap path or None) for the files
    that could be read; unreadable files are appended to `errors` as (path, reason). roots: optional dict
    file -> the folder it was found in (heat map names are relative to it)."""
    from chexcy.checkpoint import Checkpoint, load_checkpoint
    from chexcy.data import LABELS, load_image, normalize
    from chexcy.fileio import atomic_write
    from chexcy.nn import sigmoid
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    check_weights_finite(ckpt)
    model = ckpt.build_model()
    size = ckpt.image_size
    label_index = None
    if heatmap_dir is not None:
        if observation is None:
            raise ValueError(f"--heatmap needs --observation (one of: {', '.join(LABELS)})")
        from chexcy.data.schema import label_index as find_label
        label_index = find_label(observation)
        observation = LABELS[label_index]
        parent = os.path.dirname(os.path.abspath(heatmap_dir))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"--heatmap {heatmap_dir}: folder {parent} does not exist (create it first)")
        os.makedirs(heatmap_dir, exist_ok=True)
    errors = [] if errors is None else errors
    results, used_names = [], set()
    for start in range(0, len(files), batch_size):
        paths, images = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(load_image(path, size))
                paths.append(path)
            except (ValueError, OSError) as exc:
                errors.append((path, getattr(exc, "reason", None) or str(exc)))
        if not images:
            continue
        raw = np.stack(images)                                   # uint8 (B, 1, S, S)
        x = normalize(raw)
        if label_index is None:
            model.eval()
            probs = sigmoid(np.asarray(model.predict_images(x), dtype=np.float64))
            cams = None
        else:
            probs, cams = grad_cam(model, x, label_index)
        for i, path in enumerate(paths):
            heat = None
            if cams is not None:
                heat = os.path.join(heatmap_dir, _heatmap_name(path, observation, used_names, roots))
                side = _display_side(path)
                display = raw[i, 0] if side == size else load_image(path, side)[0]   # prepare's crop
                picture = render_heatmap(display, cams[i], path,
                                         f"Grad-CAM of {observation}: probability {probs[i, label_index]:.3f}")

                def write(f, picture=picture):
                    buffer = io.BytesIO()
                    picture.save(buffer, format="PNG")
                    f.write(buffer.getvalue())

                atomic_write(heat, write)
            results.append((path, probs[i], heat))
    return results


def format_results(results, fmt, stream):
    from chexcy.data import LABELS
    from chexcy.train import SHORT_NAMES
    if fmt == "json":
        doc = [dict(path=p, probabilities={n: round(float(v), 6) for n, v in zip(LABELS, probs)},
                    **({"heatmap": h} if h else {})) for p, probs, h in results]
        json.dump(doc, stream, indent=1)
        stream.write("\n")
    elif fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        with_heatmaps = any(h for _, _, h in results)
        writer.writerow(["path", *LABELS] + (["heatmap"] if with_heatmaps else []))
        for p, probs, h in results:
            writer.writerow([p, *(f"{v:.6f}" for v in probs)] + ([h or ""] if with_heatmaps else []))
    else:
        width = max([len(p) for p, _, _ in results] + [4])
        short = [SHORT_NAMES.get(n, n[:4]) for n in LABELS]
        stream.write(f"{'image':<{width}}  " + " ".join(f"{s:>5}" for s in short) + "\n")
        for p, probs, _ in results:
            stream.write(f"{p:<{width}}  " + " ".join(f"{v:5.3f}" for v in probs) + "\n")
        stream.write("(probabilities; columns: " + ", ".join(f"{s} = {n}" for s, n in zip(short, LABELS)) + ")\n")


def run(args):
    """`chexcy predict` -> exit status (1 when any input could not be labelled)."""
    from chexcy import ops
    from chexcy.checkpoint import CheckpointError, load_checkpoint
    if args.threads:
        ops.set_num_threads(args.threads)
    if args.observation and not args.heatmap:
        raise ValueError("--observation only applies with --heatmap DIR")
    ckpt = load_checkpoint(args.checkpoint)            # a bad checkpoint fails before any file is read
    try:
        check_weights_finite(ckpt)
    except CheckpointError as exc:                     # a readable file that cannot do the job: a failure
        print(f"chexcy predict: error: {exc}", file=sys.stderr)
        return 1
    files, problems, roots = collect_inputs(args.inputs)
    errors = list(problems)
    results = predict_files(ckpt, files, batch_size=args.batch_size, heatmap_dir=args.heatmap,
                            observation=args.observation, errors=errors, roots=roots)
    if results:
        format_results(results, args.format, sys.stdout)
    if args.heatmap and results:
        print(f"wrote {len(results)} Grad-CAM heat map(s) to {args.heatmap}", file=sys.stderr)
    for path, reason in errors:
        print(f"chexcy predict: cannot label {path}: {reason}", file=sys.stderr)
    if errors:
        print(f"chexcy predict: {len(errors)} input(s) could not be labelled, {len(results)} labelled",
              file=sys.stderr)
        return 1
    return 0
