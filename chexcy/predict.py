"""`chexcy predict`: 14 probabilities per image file, and Grad-CAM heat maps of where the model looked.

Preprocessing is exactly training's: `chexcy.data.load_image(path, size)` (the function `chexcy prepare`
uses) then `chexcy.data.normalize`. A multiview checkpoint scores each file as a study with that one
image as its frontal view and unknown age and sex.

Grad-CAM (Selvaraju et al. 2017): with A (C, h, w) the last convolutional feature map and y the logit of the
chosen observation, the weight of channel c is the spatial mean of dy/dA_c, and the map is
ReLU(sum_c weight_c * A_c), upsampled to the image and scaled to [0, 1]. The overlay tints the image with a
blue-to-red colour scale where the map is high.
"""
import csv
import io
import json
import math
import os
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


def overlay(image_u8, cam, min_side=256, alpha=0.55):
    """Grayscale uint8 (S, S) + map (S, S) in [0, 1] -> RGB uint8 PIL image, upscaled to >= min_side."""
    from PIL import Image
    gray = np.repeat(image_u8[..., None].astype(np.float32), 3, axis=-1)
    weight = (alpha * cam)[..., None]
    rgb = (1 - weight) * gray + weight * colormap(cam).astype(np.float32)
    out = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    scale = max(1, math.ceil(min_side / max(image_u8.shape)))
    return out.resize((image_u8.shape[1] * scale, image_u8.shape[0] * scale), Image.BILINEAR) if scale > 1 else out


def _heatmap_name(path, observation, used, roots):
    """<path relative to the folder given on the command line (or the file name), separators as '_'>
    _<observation>_gradcam.png, so CheXpert's patientN/studyM/view1_frontal.jpg files get distinct names."""
    root = roots.get(path) if roots else None
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    stem = os.path.splitext(rel)[0].replace(os.sep, "_").replace("/", "_")
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
    from chexcy.checkpoint import Checkpoint, atomic_write_bytes, load_checkpoint
    from chexcy.data import LABELS, load_image, normalize
    from chexcy.nn import sigmoid
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = ckpt.build_model()
    size = ckpt.image_size
    label_index = None
    if heatmap_dir is not None:
        if observation is None:
            raise ValueError(f"--heatmap needs --observation (one of: {', '.join(LABELS)})")
        from chexcy.data.schema import label_index as find_label
        label_index = find_label(observation)
        observation = LABELS[label_index]
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
                picture = overlay(raw[i, 0], cams[i])

                def write(f, picture=picture):
                    buffer = io.BytesIO()
                    picture.save(buffer, format="PNG")
                    f.write(buffer.getvalue())

                atomic_write_bytes(heat, write)
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
        for p, probs, h in results:
            stream.write(f"{p:<{width}}  " + " ".join(f"{v:5.3f}" for v in probs) + "\n")
        stream.write("(probabilities; columns: " + ", ".join(f"{s} = {n}" for s, n in zip(short, LABELS)) + ")\n")


def run(args):
    """`chexcy predict` -> exit status (1 when any input could not be labelled)."""
    from chexcy import ops
    from chexcy.checkpoint import load_checkpoint
    if args.threads:
        ops.set_num_threads(args.threads)
    if args.observation and not args.heatmap:
        raise ValueError("--observation only applies with --heatmap DIR")
    ckpt = load_checkpoint(args.checkpoint)            # a bad checkpoint fails before any file is read
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
