"""chexcy.distributed: sharding, the one-Allreduce gradient average, gathering, and a failing rank.

The MPI tests start `mpiexec -n 2 python script.py` in a temporary folder with PYTHONSAFEPATH=1, so the
ranks import the installed chexcy (not the source tree) exactly as a user's job would. They are skipped,
with the reason, when mpi4py or mpiexec is missing; CI installs both (`pip install ".[test,mpi]"`).
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from chexcy import distributed

MPI_TIMEOUT_S = 60     # a hung collective must fail the test, not the CI job


def find_mpiexec():
    """mpiexec of the same environment as this python (the mpich wheel puts it there), else PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    return shutil.which("mpiexec")


def mpi_skip_reason():
    if importlib.util.find_spec("mpi4py") is None:
        return 'mpi4py is not installed (pip install mpi4py mpich)'
    if find_mpiexec() is None:
        return f"no mpiexec next to {sys.executable} or on PATH"
    return None


needs_mpi = pytest.mark.skipif(mpi_skip_reason() is not None, reason=str(mpi_skip_reason()))


def subprocess_env():
    """Environment for child processes: they import the chexcy this test imported (the installed one in CI;
    PYTHONSAFEPATH keeps a source tree in the cwd out), with one OpenMP thread per rank on 2 cores."""
    import chexcy
    here = os.path.dirname(os.path.dirname(os.path.abspath(chexcy.__file__)))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONSAFEPATH="1", PYTHONPATH=path, OMP_NUM_THREADS="1")


def run_ranks(tmp_path, script, n=2, args=(), timeout=MPI_TIMEOUT_S, check=True):
    """Run `script` (Python source) under `mpiexec -n n` in tmp_path; return the CompletedProcess."""
    path = tmp_path / "rank_script.py"
    # A failed assertion on one rank must end the job at once, not leave the other rank in a collective.
    guard = "from chexcy import distributed as _d\n_d.install_excepthook(_d.init(True), 'test script')\n"
    path.write_text(guard + textwrap.dedent(script))
    env = subprocess_env()
    cmd = [find_mpiexec(), "-n", str(n), sys.executable, str(path), *map(str, args)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                             f"\n--- stderr\n{proc.stderr}")
    return proc


class Param:
    def __init__(self, data, grad):
        self.data = data
        self.grad = grad


# ---------------------------------------------------------------------------------------------------
# Without MPI: the pieces every rank computes alone
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 5, 31, 32, 33, 64])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_shards_cover_the_batch_exactly_and_in_order(n, size):
    batch = np.arange(100, 100 + n)
    parts = [distributed.shard(batch, _FakeComm(r, size)) for r in range(size)]
    np.testing.assert_array_equal(np.concatenate(parts), batch, err_msg=f"n={n} size={size}")
    lengths = [len(p) for p in parts]
    assert max(lengths) - min(lengths) <= 1, f"unbalanced shards {lengths} for n={n}, size={size}"
    assert lengths == sorted(lengths, reverse=True), "the larger shards must be the first ranks"


def test_shard_bounds_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank=2, size=2"):
        distributed.shard_bounds(10, 2, 2)


def test_local_allreduce_leaves_gradient_and_reports_loss():
    rng = np.random.default_rng(0)
    params = [Param(np.zeros((3, 4), np.float32), rng.standard_normal((3, 4)).astype(np.float32)),
              Param(np.zeros(5, np.float32), rng.standard_normal(5).astype(np.float32))]
    before = [p.grad.copy() for p in params]
    reducer = distributed.GradientAllreduce(params, distributed.LocalComm())
    assert reducer.nbytes == (12 + 5 + 4) * 4
    assert tuple(reducer(0.75, 7, rows=3)) == (0.75, 7.0, 3, False)
    for p, b in zip(params, before):
        np.testing.assert_allclose(p.grad, b, rtol=1e-6)   # (g * 7) / 7 in float32


def _FakeComm(rank, size):
    comm = distributed.LocalComm()
    comm.rank, comm.size = rank, size
    return comm


# ---------------------------------------------------------------------------------------------------
# With MPI: two ranks
# ---------------------------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.mpi
def test_flat_allreduce_gives_the_weighted_global_mean(tmp_path):
    # Rank r holds gradients g_r, loss l_r averaged over w_r terms. Expected on every rank:
    # sum_r w_r g_r / sum_r w_r (the gradient of the mean over all terms), after ONE Allreduce.
    proc = run_ranks(tmp_path, """
        import numpy as np
        from chexcy import distributed
        comm = distributed.init(True)
        class Param:
            def __init__(self, shape, seed):
                self.data = np.zeros(shape, np.float32)
                self.grad = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        shapes = [(4, 1, 3, 3), (4,), (14, 4), (14,)]
        params = [Param(s, 10 * comm.rank + i) for i, s in enumerate(shapes)]
        weights, losses = [3, 5], [0.25, 1.5]
        reducer = distributed.GradientAllreduce(params, comm)
        calls_before = reducer.calls
        loss, total, rows, stop = reducer(losses[comm.rank], weights[comm.rank], stop=(comm.rank == 1),
                                          rows=comm.rank + 2)
        want_loss = (3 * 0.25 + 5 * 1.5) / 8
        assert abs(loss - want_loss) < 1e-6, (loss, want_loss)
        assert total == 8 and rows == 5 and stop is True, (total, rows, stop)
        assert reducer.calls == calls_before + 1
        for i, (p, s) in enumerate(zip(params, shapes)):
            g = [np.random.default_rng(10 * r + i).standard_normal(s).astype(np.float32) for r in (0, 1)]
            want = (3 * g[0] + 5 * g[1]) / 8
            np.testing.assert_allclose(p.grad, want, rtol=1e-5, atol=1e-6, err_msg=f"param {i}")
        # every rank ends with the same bits
        sums = comm.allgather_object([p.grad.tobytes() for p in params])
        assert sums[0] == sums[1], "ranks disagree after the allreduce"
        # an empty shard (weight 0) contributes nothing, even with NaN gradients
        if comm.rank == 1:
            for p in params:
                p.grad[...] = np.nan
        else:
            for i, p in enumerate(params):
                p.grad[...] = i
        loss, total, _, stop = reducer(float("nan") if comm.rank else 2.0, 0 if comm.rank else 4)
        assert total == 4 and loss == 2.0 and not stop, (loss, total, stop)
        for i, p in enumerate(params):
            assert np.all(p.grad == i), (i, p.grad)
        if len(comm.allgather_object("ok")) == 2 and comm.rank == 0:   # one writer: rank outputs interleave
            print("both ranks ok")
    """)
    assert "both ranks ok" in proc.stdout, proc.stdout


@needs_mpi
@pytest.mark.mpi
def test_shards_and_gather_restore_the_global_batch(tmp_path):
    proc = run_ranks(tmp_path, """
        import numpy as np
        from chexcy import distributed
        comm = distributed.init(True)
        for n in (1, 7, 32, 33):
            batch = np.random.default_rng(n).permutation(1000)[:n]
            mine = distributed.shard(batch, comm)
            rows = np.stack([mine, mine * 2], axis=1).astype(np.float32)   # (b, 2): per-row results
            back = distributed.gather_rows(rows, comm)
            if comm.rank == 0:
                np.testing.assert_array_equal(back[:, 0], batch, err_msg=f"n={n}")
                np.testing.assert_array_equal(back[:, 1], batch * 2, err_msg=f"n={n}")
            else:
                assert back is None
            everyone = comm.allgather_object(mine.tolist())
            assert sorted(everyone[0] + everyone[1]) == sorted(batch.tolist())
            assert not set(everyone[0]) & set(everyone[1]), "a row was given to both ranks"
        # broadcast: rank 1's different start is replaced by rank 0's values
        a = np.full((3, 3), comm.rank, np.float32); b = np.full(4, 10.0 + comm.rank)
        distributed.broadcast_arrays([a, b], comm)
        assert np.all(a == 0) and np.all(b == 10.0), (a, b)
        # threads: OMP_NUM_THREADS wins; without it, this node's cores shared by its 2 ranks
        import os
        assert distributed.threads_per_rank(comm) == int(os.environ["OMP_NUM_THREADS"])
        del os.environ["OMP_NUM_THREADS"]
        cores = len(os.sched_getaffinity(0))
        want = cores if cores < os.cpu_count() else max(1, cores // 2)
        assert distributed.threads_per_rank(comm) == want, (distributed.threads_per_rank(comm), want)
        if len(comm.allgather_object("ok")) == 2 and comm.rank == 0:   # one writer: rank outputs interleave
            print("both ranks ok")
    """)
    assert "both ranks ok" in proc.stdout, proc.stdout


@needs_mpi
@pytest.mark.mpi
def test_an_exception_on_one_rank_ends_the_job(tmp_path):
    # Rank 1 raises while rank 0 waits in a collective that rank 1 never joins (and would then sleep for
    # minutes): without the guard this outlives the subprocess timeout; with it the job ends non-zero
    # within seconds, names the failing rank, and no rank runs past the failure.
    proc = run_ranks(tmp_path, """
        import time
        from chexcy import distributed
        comm = distributed.init(True)
        with distributed.abort_on_error(comm, "chexcy train"):
            if comm.rank == 1:
                time.sleep(0.2)
                raise ValueError("shard 1 cannot read images.npy")
            comm.barrier()
            time.sleep(3 * 60)      # only an abort of the whole job ends rank 0 within the timeout
        print("unreachable")
    """, check=False)
    assert proc.returncode != 0, f"job exited 0\n{proc.stdout}\n{proc.stderr}"
    assert "chexcy train: rank 1 of 2 failed: ValueError: shard 1 cannot read images.npy" in proc.stderr, \
        proc.stderr
    assert "unreachable" not in proc.stdout


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("arch", ["simple", "resnet"])
def test_two_ranks_give_the_gradients_of_the_whole_batch(tmp_path, arch):
    # One step: rank r runs its shard (5 and 4 rows of a 9-row batch, different numbers of masked labels)
    # through DataParallel; the averaged gradients and the global loss must equal those of one process on
    # all 9 rows. This also checks synchronised BatchNorm2d (global batch statistics, through the backend's kernels) and that the running
    # statistics agree; dropout 0.5 checks that each rank applies its rows of the global batch's mask. float32 tolerance: rtol 2e-4, atol 1e-6 (sums taken in a different order).
    proc = run_ranks(tmp_path, f"""
        import numpy as np
        from chexcy import distributed, nn
        comm = distributed.init(True)
        rng = np.random.default_rng(7)
        x = rng.standard_normal((9, 1, 16, 16)).astype(np.float32)
        y = (rng.random((9, 14)) < 0.3).astype(np.float32)
        y[rng.random((9, 14)) < 0.4] = np.nan
        def make():
            # different seeds per rank: DataParallel must broadcast rank 0's parameters
            return nn.build_model("{arch}", widths=[4, 8], dropout=0.5, seed=comm.rank + 3)
        # one process, whole batch (rank 0 only)
        if comm.rank == 0:
            ref = make()
            ref.load_state_dict(nn.build_model("{arch}", widths=[4, 8], dropout=0.5, seed=3).state_dict())
            ref.train()
            ref.set_random_state(np.random.default_rng(11))
            ref_loss, dlogits = nn.bce_with_logits(ref.forward(x), y)
            ref.backward(dlogits)
            ref_grads = [p.grad.copy() for p in ref.parameters()]
            ref_state = ref.state_dict()
        # A test hook on the active backend: BatchNorm2d given the communicator must run the backend's own
        # batch-norm halves (the compiled kernels on the cython backend), not a NumPy copy of its own.
        from chexcy import ops
        backend, calls = ops._backend(), {{}}
        def counted(name, f):
            def call(*args, **kwargs):
                calls[name] = calls.get(name, 0) + 1
                return f(*args, **kwargs)
            return call
        for name in ("batch_norm2d_plane_stats", "batch_norm2d_apply", "batch_norm2d_plane_grad_sums",
                     "batch_norm2d_backward_apply"):
            setattr(backend, name, counted(name, getattr(backend, name)))
        model = make()
        dp = distributed.DataParallel(model, comm)
        model.train()
        rows = distributed.shard(np.arange(9), comm)
        weight = distributed.present_labels(y[rows])
        dp.begin_step(weight, n_global=9)
        model.set_random_state(np.random.default_rng(11))
        loss, dlogits = nn.bce_with_logits(model.forward(x[rows]), y[rows])
        model.backward(dlogits)
        loss, _, n_rows, stop = dp.end_step(loss, weight, rows=len(rows))
        assert n_rows == 9 and not stop
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert ("{arch}" != "resnet" or n_bn > 0) and all(calls.get(name, 0) == n_bn for name in (
            "batch_norm2d_plane_stats", "batch_norm2d_apply", "batch_norm2d_plane_grad_sums",
            "batch_norm2d_backward_apply")), (n_bn, calls)
        if comm.rank == 0 and n_bn:
            print("batch norm ran on backend", ops.get_backend(), sorted(calls), flush=True)
            assert abs(loss - ref_loss) < 1e-6 * max(1, abs(ref_loss)), (loss, ref_loss)
            for (name, p), g in zip(model.named_parameters(), ref_grads):
                np.testing.assert_allclose(p.grad, g, rtol=2e-4, atol=1e-6, err_msg=name)
            for name, value in model.state_dict().items():
                np.testing.assert_allclose(value, ref_state[name], rtol=1e-5, atol=1e-6, err_msg=name)
        states = comm.allgather_object({{k: v.tobytes() for k, v in model.state_dict().items()}})
        assert states[0] == states[1], "ranks hold different parameters or buffers"
        if len(comm.allgather_object("ok")) == 2 and comm.rank == 0:   # one writer: rank outputs interleave
            print("both ranks ok")
    """)
    assert "both ranks ok" in proc.stdout, proc.stdout
    if arch == "resnet":
        expected = os.environ.get("CHEXCY_EXPECT_BACKEND")
        assert f"batch norm ran on backend {expected or ''}" in proc.stdout, proc.stdout


@needs_mpi
@pytest.mark.mpi
def test_a_rank_that_dies_ends_the_job(tmp_path):
    # No Python error to catch here: the launcher itself must notice the dead rank and end the others.
    proc = run_ranks(tmp_path, """
        import os, signal, time
        from chexcy import distributed
        comm = distributed.init(True)
        if comm.rank == 1:
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        comm.barrier()
        time.sleep(3 * 60)
        print("unreachable")
    """, check=False)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout, (proc.returncode, proc.stdout)


# ---------------------------------------------------------------------------------------------------
# `chexcy train --distributed` and `chexcy prepare --distributed`, end to end
# ---------------------------------------------------------------------------------------------------

# 48 training rows in batches of 15 -> 4 steps per epoch of 15, 15, 15, 3 rows: uneven shards (8 + 7) and a
# short last batch (2 + 1). resnet has 6 BatchNorm layers; dropout 0.3 exercises the sharded masks.
TRAIN_ARGS = ["--arch", "resnet", "--width", "4", "--depth", "2", "--batch-size", "15", "--dropout", "0.3",
              "--lr", "0.05", "--seed", "3", "--log-every", "2"]
# float32 tolerance after 8 SGD steps: the two runs add the same terms in a different order (per-rank
# partial sums, then the Allreduce), which moves parameters by a few units in the last place per step.
PARAM_TOL = dict(rtol=1e-4, atol=2e-6)


def chexcy_cmd(args, ranks=None):
    cmd = [sys.executable, "-m", "chexcy", *map(str, args)]
    return cmd if ranks is None else [find_mpiexec(), "-n", str(ranks), *cmd]


def run_chexcy(cwd, args, ranks=None, check=True, timeout=MPI_TIMEOUT_S):
    env = subprocess_env()
    proc = subprocess.run(chexcy_cmd(args, ranks), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(chexcy_cmd(args, ranks))} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic download and its prepared train (48) / valid (24) folders at 32x32."""
    if mpi_skip_reason():
        pytest.skip(mpi_skip_reason())
    from chexcy.data.prepare import prepare
    from chexcy.data.synth import make_synthetic
    root = tmp_path_factory.mktemp("mpi-data")
    train_csv = make_synthetic(root / "download", n_train=48, n_valid=24, seed=5, workers=1)
    valid_csv = os.path.join(os.path.dirname(train_csv), "valid.csv")
    prepare(train_csv, root / "train", size=32, workers=1, quiet=True)
    prepare(valid_csv, root / "valid", size=32, workers=1, quiet=True)
    return {"root": root, "train_csv": train_csv, "train": root / "train", "valid": root / "valid"}


def load_run(folder):
    """(arrays of last.npz except its config, step losses, epoch records, images per step from log.jsonl)."""
    with np.load(folder / "last.npz") as f:
        arrays = {k: f[k] for k in f.files if k != "config.json"}
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["loss"] for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    images = [r["images"] for r in records if r["event"] == "step"]
    return arrays, steps, epochs, images


@pytest.fixture(scope="module")
def two_rank_run(prepared):
    """`mpiexec -n 2 chexcy train --distributed`, 2 epochs (8 steps): the run other tests compare with."""
    cwd = prepared["root"]
    proc = run_chexcy(cwd, ["train", "--data", prepared["train"], "--valid", prepared["valid"], *TRAIN_ARGS,
                            "--epochs", "2", "--checkpoint-dir", cwd / "two", "--distributed"], ranks=2)
    return proc, load_run(cwd / "two")


@needs_mpi
@pytest.mark.mpi
def test_two_ranks_train_like_one_process_with_the_whole_batch(prepared, two_rank_run):
    cwd = prepared["root"]
    run_chexcy(cwd, ["train", "--data", prepared["train"], "--valid", prepared["valid"], *TRAIN_ARGS,
                     "--epochs", "2", "--threads", "1", "--checkpoint-dir", cwd / "one"])
    one_arrays, one_steps, one_epochs, one_images = load_run(cwd / "one")
    proc, (two_arrays, two_steps, two_epochs, two_images) = two_rank_run
    # every rank decoded only its part: the ranks' rows add up to the global batch, not K times it
    assert one_images == two_images == [15, 15, 15, 3] * 2, (one_images, two_images)

    assert sorted(one_arrays) == sorted(two_arrays)
    for name in one_arrays:     # parameters, BatchNorm running statistics, SGD momentum buffers
        np.testing.assert_allclose(two_arrays[name], one_arrays[name], **PARAM_TOL, err_msg=name)
    # rank 0 alone logs: one record per step, not one per rank
    assert len(two_steps) == len(one_steps) == 8, (len(two_steps), len(one_steps))
    np.testing.assert_allclose(two_steps, one_steps, rtol=1e-5, err_msg="per-step global loss")
    # validation over the whole set (gathered), not over rank 0's part
    for a, b in zip(one_epochs, two_epochs):
        assert abs(a["valid_loss"] - b["valid_loss"]) < 1e-5, (a["valid_loss"], b["valid_loss"])
        for label, auc in a["auc"].items():
            assert (auc is None) == (b["auc"][label] is None), label
            if auc is not None:
                assert abs(auc - b["auc"][label]) < 1e-6, (label, auc, b["auc"][label])
    # rank 0 alone prints
    assert proc.stdout.count("epoch 1 | train loss") == 1, proc.stdout
    assert "x 2 ranks" in proc.stdout, proc.stdout


@needs_mpi
@pytest.mark.mpi
def test_resume_with_the_same_ranks_is_exact_and_another_count_is_announced(prepared, two_rank_run):
    cwd = prepared["root"]
    common = ["train", "--data", prepared["train"], "--valid", prepared["valid"], *TRAIN_ARGS]
    run_chexcy(cwd, [*common, "--epochs", "1", "--checkpoint-dir", cwd / "halves", "--distributed"], ranks=2)
    shutil.copytree(cwd / "halves", cwd / "halves-1rank")
    proc = run_chexcy(cwd, ["train", "--data", prepared["train"], "--valid", prepared["valid"], "--epochs", "2",
                            "--checkpoint-dir", cwd / "halves", "--resume", "--distributed"], ranks=2)
    assert "resuming" in proc.stdout and "note:" not in proc.stdout, proc.stdout
    _, (want_arrays, want_steps, _, _) = two_rank_run
    got_arrays, got_steps, _, _ = load_run(cwd / "halves")
    assert got_steps == want_steps, "2-rank resume did not replay the uninterrupted 2-rank losses exactly"
    for name in want_arrays:
        np.testing.assert_array_equal(got_arrays[name], want_arrays[name], err_msg=name)

    # The same checkpoint continued by one process: allowed, announced, equal to float32 rounding.
    proc = run_chexcy(cwd, ["train", "--data", prepared["train"], "--valid", prepared["valid"], "--epochs", "2",
                            "--threads", "1", "--checkpoint-dir", cwd / "halves-1rank", "--resume"])
    assert "written by 2 rank(s), this run has 1" in proc.stdout, proc.stdout
    got_arrays, got_steps, _, _ = load_run(cwd / "halves-1rank")
    np.testing.assert_allclose(got_steps, want_steps, rtol=1e-5)
    for name in want_arrays:
        np.testing.assert_allclose(got_arrays[name], want_arrays[name], **PARAM_TOL, err_msg=name)


@needs_mpi
@pytest.mark.mpi
def test_distributed_training_refuses_a_batch_smaller_than_the_ranks(prepared):
    cwd = prepared["root"]
    proc = run_chexcy(cwd, ["train", "--data", prepared["train"], "--batch-size", "1", "--epochs", "1",
                            "--distributed"], ranks=2, check=False)
    assert proc.returncode != 0
    assert "every global batch needs at least 2 rows" in proc.stderr, proc.stderr


@needs_mpi
@pytest.mark.mpi
def test_distributed_prepare_is_byte_identical_to_one_process(prepared, tmp_path):
    from chexcy.data.prepare import prepare
    # Make one image unreadable: the skipped row must be found by whichever rank decodes it.
    download = tmp_path / "download"
    shutil.copytree(Path(prepared["train_csv"]).parent.parent, download)
    csv = download / "CheXpert-v1.0-small" / "train.csv"
    first = sorted((download / "CheXpert-v1.0-small" / "train").rglob("*.jpg"))[5]
    first.write_bytes(first.read_bytes()[:100])
    # Chunks of 8 rows (48 rows -> 6 chunks, 3 per rank) through the Python API, as `chexcy prepare` calls it.
    prepare(csv, tmp_path / "serial", size=32, workers=1, quiet=True, chunk_rows=8)
    run_ranks(tmp_path, f"""
        from chexcy import distributed
        from chexcy.data.prepare import prepare
        comm = distributed.init(True)
        m = prepare({str(csv)!r}, {str(tmp_path / "ranks")!r}, size=32, workers=1, quiet=True, chunk_rows=8, comm=comm)
        assert m["count"] == 47 and m["skipped"] == 1, m
    """)
    # The command line: the flag, its plumbing and one-process output on rank 0 only.
    run_chexcy(tmp_path, ["prepare", csv, "--out", tmp_path / "cli-serial", "--size", "32", "--workers", "1"])
    proc = run_chexcy(tmp_path, ["prepare", csv, "--out", tmp_path / "cli-ranks", "--size", "32", "--distributed"],
                      ranks=2)
    assert proc.stdout.count("prepare: wrote 47 images") == 1, proc.stdout
    for a, b in (("serial", "ranks"), ("cli-serial", "cli-ranks")):
        for name in ("images.npy", "labels.npy", "meta.csv", "skipped.csv", "manifest.json"):
            assert (tmp_path / a / name).read_bytes() == (tmp_path / b / name).read_bytes(), f"{b}/{name}"
        assert sorted(os.listdir(tmp_path / b)) == sorted(os.listdir(tmp_path / a)), "leftover files"


def test_plain_chexcy_never_imports_mpi():
    code = ("import sys; from chexcy import cli, train, data; from chexcy.data import prepare; cli.build_parser(); "
            "bad = [m for m in ('mpi4py', 'chexcy.distributed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(),
                   timeout=MPI_TIMEOUT_S)


def test_distributed_without_mpi4py_says_how_to_install_it(tmp_path):
    # sys.modules["mpi4py"] = None makes `import mpi4py` fail as if it were not installed.
    code = ("import sys; sys.modules['mpi4py'] = None; from chexcy import cli; "
            f"sys.exit(cli.main(['train', '--data', {str(tmp_path)!r}, '--distributed']))")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=MPI_TIMEOUT_S)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert 'chexcy train: error: --distributed needs mpi4py: install MPI support: pip install mpi4py mpich' \
        in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@needs_mpi
@pytest.mark.mpi
def test_sigint_stops_every_rank_after_the_same_step_and_saves(prepared):
    # mpiexec forwards SIGINT to every rank, but not at the same instant: the ranks must agree on the step
    # to stop after (the stop flag rides in the step's Allreduce), or one would wait forever for the other.
    cwd = prepared["root"]
    run = cwd / "interrupted"
    env = subprocess_env()
    proc = subprocess.Popen(chexcy_cmd(["train", "--data", prepared["train"], *TRAIN_ARGS, "--epochs", "500",
                                        "--checkpoint-dir", run, "--distributed"], ranks=2),
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + MPI_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            log = run / "log.jsonl"
            if log.exists() and log.read_text().count('"event": "step"') >= 6:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=MPI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "SIGINT: stopped after" in out, out       # after a step, or at the end of an epoch
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    stopped = [r for r in records if r["event"] == "interrupted"]
    assert len(stopped) == 1, stopped
    with np.load(run / "last.npz") as f:
        position = json.loads(f["config.json"].tobytes())["position"]
    assert position["global_step"] == stopped[0]["global_step"], (position, stopped)
