"""What `chexcy evaluate`, `predict` and `demo` leave for the user: plots and heat maps that read well,
names that do not collide, files with the umask's permissions, refusals instead of silent surprises
(missing output folders, non-finite weights), install hints that work from where the user stands."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from chexcy import demo, evaluate, predict
from chexcy.checkpoint import CheckpointError, load_checkpoint
from chexcy.data import LABELS

from test_cli_train_commands import run_cli, trained  # noqa: F401  (trained: a module-scoped fixture)


def two_patients_first_views(trained):
    folder = trained["raw"] / "valid"
    views = sorted(str(p) for p in folder.glob("patient*/study*/view1_frontal.jpg"))
    patients = {os.path.basename(os.path.dirname(os.path.dirname(v))) for v in views[:2]}
    assert len(patients) == 2, views[:2]
    return views[:2]


# -- item 14: non-finite weights ---------------------------------------------------------------------

def test_predict_refuses_a_checkpoint_with_nan_weights(trained, tmp_path):
    with np.load(trained["run"] / "best.npz") as z:
        arrays = {k: z[k] for k in z.files}
    names = [k for k in arrays if k.startswith("model/")]
    bad_name = names[1]                                   # not the first: the message must find it
    arrays[bad_name] = arrays[bad_name].copy()
    arrays[bad_name].flat[0] = np.nan
    arrays[names[-1]] = np.full_like(arrays[names[-1]], np.inf)
    np.savez(tmp_path / "diverged.npz", **arrays)
    done = run_cli("predict", "--checkpoint", tmp_path / "diverged.npz", trained["raw"] / "valid")
    assert done.returncode == 1, (done.returncode, done.stdout[:300], done.stderr)
    assert done.stdout == "", "no probabilities may be printed from non-finite weights"
    assert str(tmp_path / "diverged.npz") in done.stderr
    assert f"{bad_name[len('model/'):]}: 1 of {arrays[bad_name].size} values are NaN or inf" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(CheckpointError, match="non-finite weights"):
        predict.predict_files(load_checkpoint(tmp_path / "diverged.npz"), two_patients_first_views(trained))
    done = run_cli("evaluate", "--checkpoint", tmp_path / "diverged.npz", "--data", trained["valid"])
    assert done.returncode == 1 and done.stdout == "", (done.returncode, done.stdout[:300], done.stderr)
    assert f"{tmp_path / 'diverged.npz'}: holds non-finite weights ({bad_name[len('model/'):]}:" in done.stderr


def test_predict_accepts_finite_weights(trained):
    assert predict.first_nonfinite_weight(load_checkpoint(trained["run"] / "best.npz")) is None


# -- item 16: heat maps ----------------------------------------------------------------------------

def test_heatmaps_of_two_patients_first_views_keep_patient_and_study(trained, tmp_path):
    views = two_patients_first_views(trained)
    done = run_cli("predict", "--checkpoint", trained["run"] / "best.npz", *views, "--heatmap", tmp_path / "h",
                   "--observation", "Edema", "--format", "json")
    assert done.returncode == 0, done.stderr
    names = sorted(os.listdir(tmp_path / "h"))
    want = sorted("_".join(v.split(os.sep)[-3:]).replace(".jpg", "_edema_gradcam.png") for v in views)
    assert names == want, names                        # patientN_studyM_view1_frontal_edema_gradcam.png


def test_heatmap_names_never_collide_within_a_run(tmp_path):
    used, roots = set(), {}
    a = tmp_path / "a" / "patient00001" / "study1" / "view1_frontal.jpg"
    b = tmp_path / "b" / "patient00001" / "study1" / "view1_frontal.jpg"
    first = predict._heatmap_name(str(a), "Edema", used, roots)
    second = predict._heatmap_name(str(b), "Edema", used, roots)
    assert first == "patient00001_study1_view1_frontal_edema_gradcam.png"
    assert second != first and second.endswith("_2.png")
    # A folder given on the command line: the path below it, plus CheXpert folders above it.
    c = tmp_path / "c" / "patient00002" / "study3" / "view2_lateral.png"
    assert predict._heatmap_name(str(c), "Pleural Effusion", used, {str(c): str(c.parent)}) == \
        "patient00002_study3_view2_lateral_pleural-effusion_gradcam.png"
    plain = tmp_path / "x" / "scan.png"
    assert predict._heatmap_name(str(plain), "Edema", used, roots) == "scan_edema_gradcam.png"


def test_heatmap_is_drawn_at_the_source_resolution_with_title_and_colour_bar(trained, tmp_path):
    view = two_patients_first_views(trained)[0]
    with Image.open(view) as src:
        short = min(src.size)
    ckpt = load_checkpoint(trained["run"] / "best.npz")
    [(_, probs, heat)] = predict.predict_files(ckpt, [view], heatmap_dir=str(tmp_path), observation="Edema")
    with Image.open(heat) as img:
        assert img.mode == "RGB"
        pixels = np.asarray(img).astype(int)
    lo, hi = predict.HEATMAP_SIDE
    side = min(max(short, lo), hi)
    assert ckpt.image_size < side
    h, w, _ = pixels.shape
    assert w >= side + 20 and h >= side + 20, f"{w}x{h} for a {side}px picture with a title and a bar"
    # The title band above the picture holds dark text on white.
    title = pixels[: h - side - 8]
    assert (title.min(axis=-1) < 80).sum() > 50, "no title text drawn"
    # The colour bar right of the picture runs from the map's top colour (red) down to its bottom (blue).
    bar = pixels[h - side - 8: h - 8, side + 14: side + 18]          # inside the bar's black outline
    top, bottom = bar[3].mean(axis=0), bar[-4].mean(axis=0)
    assert top[0] > 100 > 30 > top[2] and bottom[2] > 100 > 30 > bottom[0], (top, bottom)
    # The picture itself is the source's crop at full resolution, not the 24 px input blown up.
    picture = pixels[h - side - 8: h - 8, :side]
    assert len(np.unique(picture[..., 1])) > 64
    assert 0 <= probs[LABELS.index("Edema")] <= 1


def test_heatmap_folder_in_a_missing_parent_is_refused(trained, tmp_path):
    done = run_cli("predict", "--checkpoint", trained["run"] / "best.npz", trained["raw"] / "valid",
                   "--heatmap", tmp_path / "missing" / "h", "--observation", "Edema")
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr
    assert not (tmp_path / "missing").exists()


# -- item 16: plots --------------------------------------------------------------------------------

def test_roc_styles_differ_for_all_14_labels():
    pytest.importorskip("matplotlib")
    styles = [(s["color"], s["linestyle"]) for s in (evaluate.roc_style(j, n) for j, n in enumerate(LABELS))]
    assert len(set(styles)) == 14, styles


def test_roc_figure_draws_each_label_in_its_own_style(trained):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    result = evaluate.evaluate_checkpoint(trained["run"] / "best.npz", trained["valid"], min_count=1)
    fig = evaluate.roc_figure(result)
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert len(lines) == int(np.sum(~np.isnan(result["image"]["auc"]))) >= 5
    assert len({(ln.get_color(), ln.get_linestyle()) for ln in lines}) == len(lines)
    plt.close(fig)


def test_training_figure_of_a_short_run_reads_well(trained):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    fig = evaluate.training_figure(trained["run"] / "log.jsonl")
    loss_ax, auc_ax = fig.axes
    fig.canvas.draw()
    step = next(ln for ln in loss_ax.get_lines() if ln.get_label() == "step loss")
    assert (step.get_alpha() or 1.0) >= 0.8 and step.get_linewidth() >= 1.0 and step.get_marker() not in (None, "None")
    assert not any("moving mean" in ln.get_label() for ln in loss_ax.get_lines()), \
        "8 steps need no moving mean (it would hide the step line)"
    for ax in (loss_ax, auc_ax):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    lo, hi = auc_ax.get_ylim()
    assert 0.0 <= lo and hi <= 1.0 and hi - lo >= 0.1 - 1e-9, (lo, hi)
    plt.close(fig)


@pytest.mark.parametrize("values, inside", [([0.600, 0.608], (0.600, 0.608)), ([0.98, 0.995], (0.98, 0.995)),
                                            ([0.01], (0.01, 0.01)), ([0.3, 0.9], (0.3, 0.9)), ([], (0.5, 0.5))])
def test_auc_axis_spans_at_least_a_tenth_within_0_and_1(values, inside):
    lo, hi = evaluate.auc_axis_limits(values)
    assert 0.0 <= lo <= inside[0] and inside[1] <= hi <= 1.0 and hi - lo >= 0.1 - 1e-12, (values, lo, hi)


# -- item 19: output paths and permissions ---------------------------------------------------------

def test_evaluate_json_into_a_missing_folder_is_refused(trained, tmp_path):
    target = tmp_path / "missing" / "x.json"
    done = run_cli("evaluate", "--checkpoint", trained["run"] / "best.npz", "--data", trained["valid"],
                   "--json", target)
    assert done.returncode == 2, done.stderr
    assert f"folder {tmp_path / 'missing'} does not exist" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "", "refused before scoring"
    assert not (tmp_path / "missing").exists()
    done = run_cli("evaluate", "--checkpoint", trained["run"] / "best.npz", "--data", trained["valid"],
                   "--plot", tmp_path / "missing" / "plots")
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not (tmp_path / "missing").exists()


def run_cli_with_umask(umask, *argv):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(evaluate.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "chexcy", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: os.umask(umask))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_evaluate_and_predict_outputs_get_the_umasks_permissions(trained, tmp_path, umask):
    want = 0o666 & ~umask
    argv = ["evaluate", "--checkpoint", trained["run"] / "best.npz", "--data", trained["valid"],
            "--json", tmp_path / "eval.json"]
    if _have_matplotlib():
        argv += ["--plot", tmp_path / "plots"]
    done = run_cli_with_umask(umask, *argv)
    assert done.returncode == 0, done.stderr
    outputs = [tmp_path / "eval.json"] + sorted((tmp_path / "plots").glob("*.png"))
    done = run_cli_with_umask(umask, "predict", "--checkpoint", trained["run"] / "best.npz",
                              two_patients_first_views(trained)[0], "--heatmap", tmp_path / "heat",
                              "--observation", "Edema")
    assert done.returncode == 0, done.stderr
    outputs += sorted((tmp_path / "heat").glob("*.png"))
    assert len(outputs) >= 2
    for path in outputs:
        assert os.stat(path).st_mode & 0o777 == want, f"{path}: {oct(os.stat(path).st_mode & 0o777)}, want {oct(want)}"


def _have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# -- item 15: matplotlib hints that work from a clone ------------------------------------------------

def test_missing_matplotlib_hint_works_without_a_package_index(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    with pytest.raises(RuntimeError) as err:
        evaluate.require_matplotlib()
    text = str(err.value)
    assert "pip install matplotlib" in text and 'pip install ".[plot]"' in text
    assert "chexcy[plot]" not in text, "chexcy is not on a package index: pip cannot resolve chexcy[plot]"


def test_demo_next_steps_say_how_to_get_matplotlib_when_it_is_missing():
    without = demo.next_steps("o", "o/run/best.npz", "o/prepared", "o/synthetic", have_matplotlib=False)
    with_it = demo.next_steps("o", "o/run/best.npz", "o/prepared", "o/synthetic", have_matplotlib=True)
    plot_line = next(i for i, line in enumerate(without) if line.strip().startswith("chexcy evaluate"))
    assert any("pip install matplotlib" in line for line in without[:plot_line])
    assert not any("pip install" in line for line in with_it)
    assert not any("chexcy[plot]" in line for line in without)
