"""`chexcy prepare`: a CheXpert CSV and its JPEGs -> the prepared folder of DESIGN.md section 5.

Steps: read and validate the CSV (schema.read_csv) -> select rows (filters, in a fixed order, counted) ->
apply the label policy -> decode every selected image into ``images.partial.npy`` in fixed chunks of rows,
one chunk per worker task -> drop unreadable rows -> ``images.npy``, ``labels.npy``, ``meta.csv``,
``skipped.csv`` -> ``manifest.json`` last (its presence means "complete").

Resumable and bounded in memory whatever N is:
- chunk boundaries depend only on the selection, never on the number of workers, and every image is a pure
  function of its file (images.load_image), so a resumed run writes the same bytes as a clean one;
- workers write their rows with positioned writes (os.pwrite) into the .npy file created by
  np.lib.format.open_memmap; nothing keeps the array mapped, because mapped pages would count towards the
  resident memory of the process and grow with N;
- after each chunk the parent appends one JSON line (chunk number, unreadable rows) to ``progress.jsonl``;
  a run that is killed resumes from the chunks recorded there (a torn line is ignored);
- ``request.json`` (written first) identifies the dataset being built: everything that defines the output
  (the CSV's path and sha256, the image root, filters, label policy and size). A folder holding another
  dataset, finished or not, (or unrelated files) is refused unless overwrite=True;
- one run at a time: the folder is locked (chexcy.locks) from the folder check to the end, so a second
  prepare into it fails at once naming the first;
- a full disk ends the run with a DiskFullError in words; what was decoded is kept and no temporary file is
  left, so the same command finishes the job once space is freed.
"""
import contextlib
import errno
import hashlib
import json
import os
import sys
import time

import numpy as np

from chexcy.data.images import ImageReadError, load_image
from chexcy.data.npyfile import read_npy_header
from chexcy.data.schema import (
    LABELS, PROJECTION_VALUES, SEX_VALUES, canonical, label_index, parse_path, read_csv,
)
from chexcy.fileio import DiskFullError, atomic_write, atomic_write_text, is_disk_full
from chexcy.locks import LOCK_FILES, hold_folder_lock

FORMAT_VERSION = 1
CHUNK_ROWS = 256
UNCERTAIN_MODES = ("ignore", "zeros", "ones")
BLANK_MODES = ("ignore", "zeros")
VIEW_CHOICES = ("frontal", "lateral", "all")
# Every file prepare writes; --overwrite removes exactly these and their temporaries (see _is_own_file),
# never anything else in the folder.
OUTPUT_FILES = ("manifest.json", "images.npy", "labels.npy", "meta.csv", "skipped.csv",
                "images.partial.npy", "images.npy.tmp", "request.json", "progress.jsonl",
                "images.partial.npy.tmp")


# ----------------------------------------------------------------------------------------- selection
def _csv_list(value):
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if str(v).strip()]


def select_rows(df, *, sex=None, view="all", projection=None, age_min=None, age_max=None,
                unique_patients=False, limit=None):
    """Apply the filters in a fixed order; returns (selected DataFrame, steps).

    df: a DataFrame from schema.read_csv. sex / projection: a value or a comma-separated list, matched
    case-insensitively. view: "frontal", "lateral" or "all". Ages are inclusive bounds. unique_patients
    keeps each patient's first remaining row (CSV order); limit keeps the first `limit` rows left.
    steps: list of (description, rows kept). The selection keeps CSV order and a "csv_row" column (0-based
    row in the CSV). ValueError names the filter that left nothing.
    """
    out = df.copy()
    out.insert(0, "csv_row", np.arange(len(df), dtype=np.int64))
    steps = [("rows in CSV", len(out))]
    if len(out) == 0:
        raise ValueError("the CSV has no rows")

    def step(name, keep):
        nonlocal out
        before = len(out)
        out = out[np.asarray(keep, dtype=bool)]
        steps.append((name, len(out)))
        if len(out) == 0:
            raise ValueError(f"the selection is empty after {name} (it kept 0 of {before} rows)")

    view = str(view).strip().lower()
    if view not in VIEW_CHOICES:
        raise ValueError(f"--view: unknown value {view!r}; expected one of {', '.join(VIEW_CHOICES)}")
    if view != "all":
        step(f"--view {view}", out["Frontal/Lateral"].str.lower() == view)
    if projection:
        wanted = [canonical(p, PROJECTION_VALUES, "--projection") for p in _csv_list(projection)]
        step(f"--projection {','.join(wanted)}", out["AP/PA"].isin(wanted))
    if sex:
        wanted = [canonical(s, SEX_VALUES, "--sex") for s in _csv_list(sex)]
        step(f"--sex {','.join(wanted).lower()}", out["Sex"].isin(wanted))
    if age_min is not None:
        step(f"--age-min {age_min:g}", out["Age"] >= float(age_min))
    if age_max is not None:
        step(f"--age-max {age_max:g}", out["Age"] <= float(age_max))
    if unique_patients:
        patients = out["Path"].map(lambda p: parse_path(p)[1])
        step("--unique-patients", ~patients.duplicated(keep="first").to_numpy())
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        keep = np.zeros(len(out), dtype=bool)
        keep[: int(limit)] = True
        step(f"--limit {int(limit)}", keep)
    return out.reset_index(drop=True), steps


# ----------------------------------------------------------------------------------------- label policy
def resolve_policy(uncertain="ignore", blank="ignore", uncertain_ones=None, uncertain_zeros=None,
                   uncertain_ignore=None):
    """The label policy as a dict: {"uncertain": {label: mode, ... all 14}, "blank": mode}.

    uncertain: the default for -1 ("ignore" masks it, "zeros" -> 0, "ones" -> 1); the per-column lists
    (comma-separated names, case-insensitive) override it. blank: "ignore" masks, "zeros" -> 0.
    """
    uncertain = str(uncertain).lower()
    blank = str(blank).lower()
    if uncertain not in UNCERTAIN_MODES:
        raise ValueError(f"--uncertain: unknown policy {uncertain!r}; expected one of {', '.join(UNCERTAIN_MODES)}")
    if blank not in BLANK_MODES:
        raise ValueError(f"--blank: unknown policy {blank!r}; expected one of {', '.join(BLANK_MODES)}")
    modes = {label: uncertain for label in LABELS}
    claimed = {}
    for mode, names in (("ones", uncertain_ones), ("zeros", uncertain_zeros), ("ignore", uncertain_ignore)):
        for name in _csv_list(names):
            label = LABELS[label_index(name)]
            if label in claimed and claimed[label] != mode:
                raise ValueError(f"{label!r} is given both --uncertain-{claimed[label]} and --uncertain-{mode}")
            claimed[label] = mode
            modes[label] = mode
    return {"uncertain": modes, "blank": blank}


def apply_policy(raw, policy):
    """raw float (N, 14) CSV values (1, 0, -1, NaN) -> float32 (N, 14) targets, NaN = masked."""
    raw = np.asarray(raw, dtype=np.float64)
    out = raw.copy()
    for j, label in enumerate(LABELS):
        col = out[:, j]
        mode = policy["uncertain"][label]
        unc = raw[:, j] == -1.0
        col[unc] = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[mode]
        if policy["blank"] == "zeros":
            col[np.isnan(raw[:, j])] = 0.0
    return out.astype(np.float32)


def label_counts(labels):
    """{label: (positives, negatives, masked)} for float32 (N, 14) targets."""
    return {label: (int((labels[:, j] == 1).sum()), int((labels[:, j] == 0).sum()),
                    int(np.isnan(labels[:, j]).sum())) for j, label in enumerate(LABELS)}


# ----------------------------------------------------------------------------------------- helpers
def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_csv(path, frame):
    """DataFrame -> CSV file, atomically (pandas streams it in chunks: no whole-file string)."""
    atomic_write(path, lambda f: frame.to_csv(f, index=False, lineterminator="\n"), mode="w", encoding="utf-8",
                 newline="")


def _save_npy(path, array):
    atomic_write(path, lambda f: np.save(f, array))


def _disk_full(path):
    """The DiskFullError for a full disk while writing `path` in place (images, progress records)."""
    return DiskFullError(errno.ENOSPC, f"disk full while writing {path}; the images decoded so far are kept: "
                                       "free some space and run the same command again to finish")


@contextlib.contextmanager
def _disk_full_in_words(path):
    """Turn ENOSPC / EDQUOT raised in the block into _disk_full(path)."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise _disk_full(path) from None
        raise


def _pwrite_all(fd, data, offset, path):
    """Write the bytes-like `data` at `offset` of the open file `fd` (pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    pos, end = 0, len(view)
    with _disk_full_in_words(path):
        while pos < end:
            pos += os.pwrite(fd, view[pos:], offset + pos)


def default_root(csv_path, first_path):
    """The folder the CSV's Path column is relative to: the parent of the CSV's folder when that folder is
    the Path's first component (the real download: <root>/CheXpert-v1.0-small/train.csv), else the CSV's
    own folder."""
    csv_dir = os.path.dirname(os.path.abspath(csv_path))
    first = str(first_path).replace("\\", "/").split("/")[0]
    return os.path.dirname(csv_dir) if os.path.basename(csv_dir) == first else csv_dir


def _create_npy(path, shape):
    """Create a zero-filled (sparse) uint8 .npy file of `shape` and unmap it at once (removed again when
    that fails, e.g. on a full disk)."""
    try:
        with _disk_full_in_words(path):
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
            array.flush()
            del array
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise


# ----------------------------------------------------------------------------------------- workers
def _decode_chunk(task):
    """Worker: decode rows [start, start + len(paths)) and pwrite them into the partial images file.

    Returns (chunk number, [(row, reason), ...]) for the rows that could not be read (written as zeros).
    """
    chunk, start, paths, size, images_path, offset = task
    row_bytes = size * size
    block = np.zeros((len(paths), 1, size, size), dtype=np.uint8)
    skipped = []
    for i, path in enumerate(paths):
        try:
            block[i] = load_image(path, size)
        except ImageReadError as exc:
            skipped.append((start + i, exc.reason))
    fd = os.open(images_path, os.O_WRONLY)
    try:
        _pwrite_all(fd, block, offset + start * row_bytes, images_path)
    finally:
        os.close(fd)
    return chunk, skipped


class _Progress:
    """A one-line progress bar on stderr; silent when quiet or when stderr is not a terminal."""

    def __init__(self, total, quiet):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.enabled = not quiet and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.last = 0.0

    def update(self, n):
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        sys.stderr.write(f"\rprepare [{bar}] {self.done}/{self.total} {100 * frac:5.1f}% "
                         f"{rate:7.0f} img/s ETA {eta:5.0f}s")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# ----------------------------------------------------------------------------------------- folder state
def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_own_file(name):
    """True for the files prepare writes into --out, and the temporaries atomic_write makes of them."""
    if name in OUTPUT_FILES:
        return True
    # atomic_write's temporaries: ".NAME.<random>.tmp"
    return name.startswith(".") and name.endswith(".tmp") and name[1:-4].rsplit(".", 1)[0] in OUTPUT_FILES


def _is_lock_file(name):
    """The folder lock's files (chexcy.locks), their temporaries included: neither ours to remove nor foreign."""
    return any(name == lock or name.startswith("." + lock + ".") for lock in LOCK_FILES)


def _differences(held, wanted, prefix=""):
    """Dotted names of the entries that differ between two identity dicts (nested dicts are compared by entry)."""
    out = []
    for key in sorted(set(held) | set(wanted)):
        a, b = held.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _describe_differences(held, wanted):
    """"root (/a there, /b asked for), filters.limit (10 there, 20 asked for)": what differs, in words."""
    parts = []
    for name in _differences(held, wanted):
        a, b = held, wanted
        for key in name.split("."):
            a = a.get(key) if isinstance(a, dict) else None
            b = b.get(key) if isinstance(b, dict) else None
        readable = not name.endswith("sha256") and not isinstance(a, (dict, list)) and not isinstance(b, (dict, list))
        shown = f" ({a} there, {b} asked for)" if readable and len(f"{a}{b}") <= 200 else ""
        parts.append(name + shown)
    return ", ".join(parts)


def _check_folder(out, identity, overwrite, log):
    """Decide what to do with the output folder: "complete", "resume" or "fresh" (after any cleanup)."""
    manifest = _read_json(os.path.join(out, "manifest.json"))
    request = _read_json(os.path.join(out, "request.json"))
    present = {name for name in os.listdir(out) if not _is_lock_file(name)}
    ours = {name for name in present if _is_own_file(name)}
    held = manifest.get("identity") if isinstance(manifest, dict) else None
    if held is None and isinstance(request, dict):
        held = request.get("identity")
    if held == identity:
        if manifest is not None and not overwrite:
            return "complete"
        if manifest is None and not overwrite:
            # Temporaries of atomic writes cut short by a kill: stale, as this run holds the folder's lock.
            for name in ours - set(OUTPUT_FILES):
                os.remove(os.path.join(out, name))
            return "resume"
    elif not overwrite:
        if isinstance(held, dict):
            what = "a different prepared dataset" if manifest is not None else \
                "an unfinished prepare of a different dataset"
            raise FileExistsError(
                f"{out} holds {what} (differs in: {_describe_differences(held, identity)}); "
                "choose another --out or pass --overwrite")
        if present:
            what = "a partial or damaged chexcy folder" if ours else "other files"
            raise FileExistsError(f"{out} is not empty and holds {what} ({', '.join(sorted(present)[:5])}); "
                                  "choose another --out or pass --overwrite")
    for name in ours:
        os.remove(os.path.join(out, name))
    if ours:
        log(f"--overwrite: removed {len(ours)} previous file(s) from {out}")
    return "fresh"


# ----------------------------------------------------------------------------------------- prepare
def prepare(csv_path, out, *, workers=1, **options):
    """Prepare `csv_path` into folder `out`; returns the manifest dict. See the module docstring.

    options: root, size (128), sex, view ("all"), projection, age_min, age_max, unique_patients, limit,
    uncertain ("ignore"), uncertain_ones / uncertain_zeros / uncertain_ignore (comma-separated names),
    blank ("ignore"), overwrite, strict, quiet, log (print), chunk_rows, comm -- as the flags of
    `chexcy prepare`. workers: decoding processes; the result does not depend on it.

    The worker processes are forked before the CSV is read, so they never hold a copy of the table and
    memory stays flat as the CSV grows.
    """
    if int(workers) < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    # The folder lock, taken by _prepare once the arguments are checked, is released last: after the
    # workers have stopped writing into the folder. The pool is forked before it, so workers never hold it.
    with contextlib.ExitStack() as held:
        pool = None
        if int(workers) > 1:
            import multiprocessing as mp
            pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(int(workers))
        try:
            manifest = _prepare(csv_path, out, workers=int(workers), pool=pool, hold=held.enter_context, **options)
            if pool is not None:
                pool.close()
                pool.join()
            return manifest
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()


def _prepare(csv_path, out, *, root=None, size=128, sex=None, view="all", projection=None, age_min=None,
             age_max=None, unique_patients=False, limit=None, uncertain="ignore", uncertain_ones=None,
             uncertain_zeros=None, uncertain_ignore=None, blank="ignore", workers=1, overwrite=False,
             strict=False, quiet=False, log=print, chunk_rows=CHUNK_ROWS, comm=None, pool=None, hold):
    """The body of prepare(), decoding with `pool` (a multiprocessing pool, or None: in this process).

    hold(context manager): enters the folder lock for as long as the caller decides (prepare: until its
    workers have stopped).

    comm: a chexcy.distributed communicator (`chexcy prepare --distributed` under mpiexec): the ranks decode
    disjoint chunks into the same images file (`out` on a file system every rank sees); rank 0 alone
    checks the folder, prints and writes the other files. The result is byte-identical to one process's.
    """
    from chexcy import __version__
    import pandas as pd

    size = int(size)
    if not 8 <= size <= 4096:
        raise ValueError(f"--size must be between 8 and 4096, got {size}")
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    say = (lambda *a, **k: None) if quiet else log
    root_rank = comm is None or comm.is_root          # MPI hook: rank 0 alone prints and writes
    if not root_rank:
        quiet, say = True, (lambda *a, **k: None)
    csv_path = os.path.abspath(os.fspath(csv_path))
    df = read_csv(csv_path)
    selected, steps = select_rows(df, sex=sex, view=view, projection=projection, age_min=age_min,
                                  age_max=age_max, unique_patients=unique_patients, limit=limit)
    del df
    policy = resolve_policy(uncertain, blank, uncertain_ones, uncertain_zeros, uncertain_ignore)
    raw = selected[list(LABELS)].to_numpy(np.float64)
    labels = apply_policy(raw, policy)
    filters = {"sex": sex, "view": str(view).lower(), "projection": projection, "age_min": age_min,
               "age_max": age_max, "unique_patients": bool(unique_patients), "limit": limit}
    root = os.path.abspath(root) if root else default_root(csv_path, selected["Path"].iloc[0])
    # Everything the output depends on: a folder holding another identity, finished or not, is refused.
    identity = {"format_version": FORMAT_VERSION, "source_csv": csv_path, "source_sha256": file_sha256(csv_path),
                "root": root, "filters": filters, "policy": policy, "size": size}

    say(f"prepare: {csv_path}")
    for name, kept in steps:
        say(f"  {name:<28s} {kept:>8d} rows")
    say(f"  labels after policy (uncertain default {uncertain}, blank {blank}):   pos      neg   masked")
    for label, (p, n, m) in label_counts(labels).items():
        say(f"    {label:<28s} {p:>8d} {n:>8d} {m:>8d}")

    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    if root_rank:          # the other ranks of a distributed prepare work under rank 0's lock
        hold(hold_folder_lock(out, "chexcy prepare"))
    state = _check_folder(out, identity, overwrite, say) if root_rank else None
    if comm is not None:
        state = comm.bcast_object(state)
    if state == "complete":
        manifest = _read_json(os.path.join(out, "manifest.json"))
        say(f"prepare: {out} already holds this dataset ({manifest['count']} images); nothing to do")
        return manifest

    n = len(selected)
    partial = os.path.join(out, "images.partial.npy")
    final_images = os.path.join(out, "images.npy")
    progress_path = os.path.join(out, "progress.jsonl")
    done = {}
    if state == "resume":
        # Chunk numbers in progress.jsonl mean rows of the chunk size the run started with.
        chunk_rows = int((_read_json(os.path.join(out, "request.json")) or {}).get("chunk_rows", chunk_rows))
        if os.path.exists(progress_path):
            with open(progress_path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        done[int(rec["chunk"])] = [(int(r), str(why)) for r, why in rec["skipped"]]
                    except (ValueError, KeyError, TypeError):
                        continue       # a torn line (a kill or a full disk mid-write): that chunk is redone
    elif root_rank:
        atomic_write_text(os.path.join(out, "request.json"),
                          json.dumps({"identity": identity, "chunk_rows": int(chunk_rows)}, indent=1))
    n_chunks = (n + chunk_rows - 1) // chunk_rows
    paths = [os.path.join(root, p) for p in selected["Path"]]
    if not os.path.exists(final_images):
        if root_rank and not os.path.exists(partial):
            done = {}
            _create_npy(partial + ".tmp", (n, 1, size, size))
            os.replace(partial + ".tmp", partial)
        if comm is not None:      # every rank goes on from rank 0's record, once the file exists
            done = comm.bcast_object(done)
        offset = read_npy_header(partial).offset
        todo = [(c, c * chunk_rows, paths[c * chunk_rows:(c + 1) * chunk_rows], size, partial, offset)
                for c in range(n_chunks) if c not in done]
        if comm is not None:      # disjoint work: every K-th chunk still to do
            todo = todo[comm.rank::comm.size]
        if done:
            say(f"prepare: resuming, {len(done)} of {n_chunks} chunks already done")
        bar = _Progress(n, quiet)
        bar.update(sum(min(chunk_rows, n - c * chunk_rows) for c in done))
        t0 = time.perf_counter()
        with _ProgressRecords(progress_path) as progress_file:
            def record(chunk, skipped):
                if strict and skipped:
                    row, reason = skipped[0]
                    raise RuntimeError(f"{paths[row]}: {reason} (--strict stops at the first unreadable image; "
                                       "without it such files are skipped and listed in skipped.csv)")
                done[chunk] = skipped
                progress_file.append({"chunk": chunk, "skipped": skipped})
                bar.update(min(chunk_rows, n - chunk * chunk_rows))

            if pool is None or len(todo) <= 1:
                for task in todo:
                    record(*_decode_chunk(task))
            else:
                for chunk, skipped in pool.imap_unordered(_decode_chunk, todo):
                    record(chunk, skipped)
        if comm is not None:      # every rank's chunks (and unreadable rows), once all have written theirs
            for part in comm.allgather_object(done):
                done.update(part)
        elapsed = time.perf_counter() - t0
        n_done = sum(min(chunk_rows, n - t[1]) for t in todo)
        if n_done:
            say(f"prepare: decoded {n_done} images in {elapsed:.1f} s ({n_done / max(elapsed, 1e-9):.0f} img/s, "
                f"{workers} worker(s))")

    if not root_rank:             # rank 0 writes the rest; the others wait for its manifest
        return comm.bcast_object(None)
    skipped = sorted((row, reason) for chunk in done.values() for row, reason in chunk)
    skipped_rows = np.array([r for r, _ in skipped], dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    keep[skipped_rows] = False
    count = int(keep.sum())
    if count == 0:
        raise ValueError(f"none of the {n} selected images could be read (first: {paths[skipped[0][0]]}: "
                         f"{skipped[0][1]}); see the paths under --root {root}")
    if not os.path.exists(final_images):
        _finish_images(partial, final_images, keep, size)

    meta = pd.DataFrame({
        "path": selected["Path"],
        "csv_row": selected["csv_row"],
        "patient": selected["Path"].map(lambda p: parse_path(p)[1]),
        "study": selected["Path"].map(lambda p: parse_path(p)[2]),
        "view": selected["Frontal/Lateral"],
        "ap_pa": selected["AP/PA"],
        "sex": selected["Sex"],
        "age": selected["Age"],
    })
    for label in LABELS:
        meta[label] = selected[label]
    _save_npy(os.path.join(out, "labels.npy"), np.ascontiguousarray(labels[keep]))
    _write_csv(os.path.join(out, "meta.csv"), meta[keep])
    skipped_df = pd.DataFrame({"path": [selected["Path"].iloc[r] for r, _ in skipped],
                               "csv_row": [int(selected["csv_row"].iloc[r]) for r, _ in skipped],
                               "reason": [why for _, why in skipped]})
    _write_csv(os.path.join(out, "skipped.csv"), skipped_df)
    manifest = {
        "format_version": FORMAT_VERSION,
        "chexcy_version": __version__,
        "source_csv": csv_path,
        "source_sha256": identity["source_sha256"],
        "root": root,
        "filters": filters,
        "selection_steps": [[name, kept] for name, kept in steps],
        "policy": policy,
        "size": size,
        "selected": n,
        "count": count,
        "skipped": len(skipped),
        "label_names": list(LABELS),
        "label_counts": {k: list(v) for k, v in label_counts(labels[keep]).items()},
        "preprocessing": "grayscale (ITU-R 601-2 luma for colour, v/257 for 16-bit), centred square of the "
                         "shorter side, box-filter resize to size x size (JPEG draft decoding)",
        "files": {"images": "images.npy", "labels": "labels.npy", "meta": "meta.csv", "skipped": "skipped.csv"},
        "identity": identity,
    }
    atomic_write_text(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1) + "\n")
    for name in ("request.json", "progress.jsonl"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    say(f"prepare: wrote {count} images of {size}x{size} to {out}" +
        (f"; {len(skipped)} unreadable image(s) listed in skipped.csv" if skipped else ""))
    if comm is not None:
        comm.bcast_object(manifest)
    return manifest


class _ProgressRecords:
    """progress.jsonl opened for appending one JSON line per finished chunk, each in one write(2).

    A torn last line (a kill or a full disk mid-write) is ended with a newline on opening, so the records
    appended after it stay readable. A full disk raises the DiskFullError of _disk_full.
    """

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        with _disk_full_in_words(self.path):
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                end = os.lseek(self.fd, 0, os.SEEK_END)
                if end and os.pread(self.fd, 1, end - 1) != b"\n":
                    os.write(self.fd, b"\n")
            except BaseException:
                os.close(self.fd)
                raise
        return self

    def append(self, record):
        data = (json.dumps(record) + "\n").encode()
        with _disk_full_in_words(self.path):
            written = os.write(self.fd, data)
            if written < len(data):           # only a full disk cuts a regular file's write short
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __exit__(self, *exc):
        os.close(self.fd)


def _finish_images(partial, final_images, keep, size):
    """partial (N rows) -> final (keep.sum() rows): a rename when nothing was skipped, else a streamed copy
    of the kept rows (bounded memory; the partial file stays intact until the copy is complete, and the
    copy is removed if it cannot be completed)."""
    if keep.all():
        with _disk_full_in_words(partial), open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, final_images)
        return
    row_bytes = size * size
    src_offset = read_npy_header(partial).offset
    tmp = final_images + ".tmp"
    _create_npy(tmp, (int(keep.sum()), 1, size, size))
    try:
        dst_offset = read_npy_header(tmp).offset
        kept = np.flatnonzero(keep)
        with open(partial, "rb") as src:
            dst = os.open(tmp, os.O_WRONLY)
            try:
                for first in range(0, len(kept), CHUNK_ROWS):
                    rows = kept[first:first + CHUNK_ROWS]
                    lo, hi = int(rows[0]), int(rows[-1]) + 1
                    src.seek(src_offset + lo * row_bytes)
                    block = np.frombuffer(src.read((hi - lo) * row_bytes), dtype=np.uint8).reshape(hi - lo, row_bytes)
                    _pwrite_all(dst, np.ascontiguousarray(block[rows - lo]), dst_offset + first * row_bytes,
                                final_images)
                with _disk_full_in_words(final_images):
                    os.fsync(dst)
            finally:
                os.close(dst)
        os.replace(tmp, final_images)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.remove(partial)
