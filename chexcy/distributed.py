"""Data-parallel chexcy on MPI (mpi4py): everything that talks to other ranks lives here.

Only `--distributed` imports this module's MPI side; plain chexcy never imports mpi4py. Every helper
also works with `LocalComm`, a one-process stand-in, so the training and preparation code has a single
path whatever the number of ranks.

Legend: K ranks, r this rank, B global batch (rows of one optimiser step over all ranks), b = B_r the
rows of rank r, P the total number of gradient scalars.

The scheme (see docs/distributed.md for how to run it and the cost model):
- Sharding: every rank computes the same global batch (same seed, same epoch permutation) and keeps the
  contiguous slice `shard_bounds(B, r, K)`; the slices of ranks 0..K-1 in order are exactly the batch.
  B need not be divisible by K: the first B % K ranks take one row more. The loader decodes only the
  rank's rows (its `shard` hook).
- Gradients: one `Allreduce` per step over one preallocated float32 buffer of P + 4 numbers. Each rank
  packs its gradient multiplied by its weight w_r (the number of terms its loss averaged over, e.g.
  present labels), then w_r * loss_r, w_r, its rows and a stop flag. After the sum, gradient / sum(w) is
  the gradient of the global mean loss -- exactly what one process computes on the whole batch, even when
  shards have different sizes or different numbers of masked labels. The loss and the stop request
  (SIGINT/SIGTERM on any rank) come out global too, so every rank stops after the same step.
- BatchNorm: synchronised batch statistics (`SyncBatchNorm2d`): in training mode the per-channel sums
  (forward) and the per-channel gradient sums (backward) are summed over ranks, so normalisation uses
  the statistics of the whole global batch and the running mean/var are identical on every rank. This is
  the choice that makes "K ranks x B/K == 1 process x B" hold (to float32 rounding); its cost is three
  small Allreduces (C + 1, C and 2C float64) per BatchNorm layer per step.
- Dropout: each rank applies its rows of the mask drawn for the whole global batch.
- Validation: each rank scores its part of every validation batch; `gather_rows` (Gatherv) brings the
  scores to rank 0, they are put back in row order and shared, so the AUC is that of the whole set.
- Errors: `abort_on_error` turns an uncaught exception on any rank (a bad file, a NaN loss) into a message
  naming the rank and `MPI.COMM_WORLD.Abort`, so the job ends instead of the other ranks waiting forever
  in a collective. `check_ranks_agree` compares, with one allgather at start, what every rank must share
  (data fingerprint and length, settings): ranks whose data differ in length would otherwise pair
  different collectives and wait forever.
- Signals: SIGINT/SIGTERM stop every rank after the same step (the flag rides in the step's Allreduce).
  A rank blocked inside a collective cannot run Python's signal handler, so a watchdog thread sees the
  signal (signal.set_wakeup_fd) and ends the process when the rank stays blocked STUCK_AFTER_SIGNAL_S
  seconds after it, or at a second signal; the launcher then ends the others.
"""
import collections
import contextlib
import functools
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np

from chexcy.fileio import DiskFullError

MPI_EXTRA_HINT = 'install the MPI extra: pip install "chexcy[mpi]" (mpi4py and an MPI implementation)'


# ---------------------------------------------------------------------------------------------------
# Communicators
# ---------------------------------------------------------------------------------------------------

class LocalComm:
    """The one-process stand-in: rank 0 of 1; every collective is the identity."""

    rank = 0
    size = 1
    is_mpi = False

    @property
    def is_root(self):
        return self.rank == 0

    def allreduce_sum_(self, buf):
        """Sum `buf` (contiguous ndarray) over ranks, in place. Returns buf."""
        return buf

    def allreduce_sum(self, value):
        """Sum a Python number over ranks."""
        return value

    def bcast_(self, buf, root=0):
        """Overwrite `buf` (contiguous ndarray) with root's copy, in place. Returns buf."""
        return buf

    def bcast_object(self, obj, root=0):
        return obj

    def allgather_object(self, obj):
        return [obj]

    def gatherv_rows(self, local):
        """Concatenate every rank's `local` (n_r, ...) along axis 0 on rank 0 (None elsewhere)."""
        return np.ascontiguousarray(local)

    def barrier(self):
        pass

    def abort(self, code=1):
        os._exit(code)

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _collective(method):
    """Mark the time this rank enters a collective (`busy_since`), for the signal watchdog."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self.busy_since = time.monotonic()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.busy_since = None
    return wrapper


class MPIComm(LocalComm):
    """mpi4py's COMM_WORLD behind the LocalComm interface.

    `busy_since`: time.monotonic() when this rank entered the collective it is blocked in, else None."""

    is_mpi = True
    busy_since = None

    def __init__(self, comm=None):
        MPI = import_mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    @_collective
    def allreduce_sum_(self, buf):
        _check_buffer(buf, "allreduce_sum_")
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    @_collective
    def allreduce_sum(self, value):
        return self.comm.allreduce(value, op=self.MPI.SUM)

    @_collective
    def bcast_(self, buf, root=0):
        _check_buffer(buf, "bcast_")
        self.comm.Bcast(buf, root=root)
        return buf

    @_collective
    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    @_collective
    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    @_collective
    def gatherv_rows(self, local):
        local = np.ascontiguousarray(local)
        # Shapes and dtypes first (a small object gather), so ranks may hold different row counts
        # and a mismatch is reported instead of corrupting the receive buffer.
        shapes = self.comm.gather((local.shape, local.dtype.str), root=0)
        # The data travel as bytes, so any dtype works without an MPI datatype table.
        send = local.reshape(-1).view(np.uint8)
        if self.rank != 0:
            self.comm.Gatherv(send, None, root=0)
            return None
        tails = {s[1:] for s, _ in shapes}
        dtypes = {d for _, d in shapes}
        if len(tails) != 1 or len(dtypes) != 1:
            raise ValueError(f"gather_rows: ranks sent incompatible arrays (shape, dtype) {shapes}")
        row_bytes = int(np.prod(local.shape[1:], dtype=np.int64)) * local.dtype.itemsize
        counts = [int(s[0]) * row_bytes for s, _ in shapes]
        displs = [int(x) for x in np.concatenate([[0], np.cumsum(counts)[:-1]])]
        out = np.empty((int(sum(s[0] for s, _ in shapes)),) + local.shape[1:], dtype=local.dtype)
        self.comm.Gatherv(send, [out.reshape(-1).view(np.uint8), counts, displs, self.MPI.BYTE], root=0)
        return out

    @_collective
    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


def _check_buffer(buf, name):
    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
        raise TypeError(f"{name}: expected a C-contiguous numpy array, got {type(buf).__name__}")


class MPIUnavailable(ImportError, RuntimeError):
    """mpi4py (or its MPI library) cannot be loaded. A RuntimeError too, so `chexcy` reports it in one line."""


def import_mpi():
    """Import mpi4py.MPI, or raise MPIUnavailable saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise MPIUnavailable(f"--distributed needs mpi4py: {MPI_EXTRA_HINT} ({exc})") from None
    return MPI


def init(distributed=True):
    """The communicator for this process: `MPIComm` when `distributed`, else `LocalComm`.

    Started without mpiexec, an MPI program is one rank of one (a "singleton"), which is valid.
    """
    if not distributed:
        return LocalComm()
    return MPIComm()


# ---------------------------------------------------------------------------------------------------
# Errors: one failing rank ends the job
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def abort_on_error(comm, what="chexcy"):
    """Run the body; on any exception print `WHAT: rank r of K failed: error` and abort the job.

    Errors a user causes (EXPECTED_ERRORS: bad arguments or files) get that one line; others also their
    traceback.

    Without this, a rank that raises leaves the other ranks blocked in their next collective until the
    job's wall-clock limit. `SystemExit(0)` passes through; every other exit from the body is fatal
    for the whole job when K > 1. With one rank the exception propagates unchanged.
    """
    try:
        yield
    except SystemExit as exc:
        if exc.code in (0, None) or comm.size == 1:
            raise
        _report_and_abort(comm, what, f"exit status {exc.code}", None, code=exc.code if isinstance(exc.code, int) else 1)
    except BaseException as exc:   # noqa: B902 -- KeyboardInterrupt too: a half-stopped job hangs
        if comm.size == 1 or getattr(exc, "raised_on_every_rank", False):
            raise       # every rank raises it alike (see raise_on_every_rank): all exit, none waits
        _report_and_abort(comm, what, f"{type(exc).__name__}: {exc}", exc)


# Seconds between printing a rank's error and MPI_Abort (see _report_and_abort).
ABORT_GRACE_S = 0.5

# Failures a user causes (bad arguments or files) get one line; anything else also its traceback.
EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError, ImportError,
                   DiskFullError)


def raise_on_every_rank(exc):
    """Mark `exc` as raised by every rank alike (after a collective decision), and return it.

    abort_on_error lets such an error end each rank normally (one clear line, exit status of the command)
    instead of aborting the job: no rank is left waiting for another."""
    exc.raised_on_every_rank = True
    return exc


def check_ranks_agree(comm, facts):
    """Raise, on every rank, a ValueError naming what differs unless all ranks hold the same `facts`.

    facts: dict name -> picklable value that must be equal on every rank (e.g. the training data's
    fingerprint and length, the settings). One allgather; call it at start, before the first collective
    whose count depends on these facts (ranks whose data differ in length would pair different collectives
    and wait for each other forever)."""
    gathered = comm.allgather_object(dict(facts))
    problems = []
    for name in facts:
        values = [g.get(name) for g in gathered]
        if all(v == values[0] for v in values[1:]):
            continue
        if all(isinstance(v, dict) for v in values):
            keys = sorted({k for v in values for k in v if any(w.get(k) != v.get(k) for w in values)})
            for key in keys:
                problems.append(f"{name} {key}: " + ", ".join(f"rank {r} {v.get(key)!r}" for r, v in enumerate(values)))
        else:
            problems.append(f"{name}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values)))
    if problems:
        raise raise_on_every_rank(ValueError(
            f"the {comm.size} ranks of this job were not given the same run: " + "; ".join(problems)
            + "; give every rank the same data and settings"))


def _report_and_abort(comm, what, message, exc, code=1):
    if exc is not None and not isinstance(exc, EXPECTED_ERRORS):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{what}: rank {comm.rank} of {comm.size} failed: {message}; aborting all ranks",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Our stdout/stderr are pipes to the launcher's proxy, and MPI_Abort makes the launcher kill every
    # process, proxies included, possibly before they forwarded what is already in the pipes (seen with
    # MPICH's hydra: about 1 run in 30 lost the whole message). A short pause lets the message out.
    time.sleep(ABORT_GRACE_S)
    comm.abort(code or 1)
    os._exit(code or 1)        # MPI_Abort may return before the launcher kills us: never resume the body


def install_excepthook(comm, what="chexcy"):
    """Make an uncaught exception anywhere in this process abort the whole job (sys.excepthook).

    The same guarantee as `abort_on_error` for scripts that do not wrap their body in it.
    """
    def hook(exc_type, exc, tb):
        if comm.size == 1:
            sys.__excepthook__(exc_type, exc, tb)
            return
        _report_and_abort(comm, what, f"{exc_type.__name__}: {exc}", exc)
    sys.excepthook = hook


def threads_per_rank(comm):
    """Kernel threads for each rank when none were asked for: the cores of this node divided among the
    ranks placed on it (so K ranks on one machine do not each start one thread per core).
    OMP_NUM_THREADS, when set, wins (the usual way to say it on a cluster)."""
    local = 1
    if comm.is_mpi:             # a collective: every rank takes part, whatever its environment says
        node = comm.comm.Split_type(comm.MPI.COMM_TYPE_SHARED)
        local = node.Get_size()
        node.Free()
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # With a binding launcher (srun --cpu-bind, mpiexec -bind-to core) the affinity already is this
    # rank's share: do not divide it again.
    if cores < (os.cpu_count() or cores):
        return max(1, cores)
    return max(1, cores // local)


# Seconds a rank may stay blocked in one collective after SIGINT/SIGTERM before it ends itself. A healthy
# job leaves every collective within one step of its slowest rank; a rank blocked this long after the
# signal waits for a partner that will never come.
STUCK_AFTER_SIGNAL_S = 30.0


class SignalWatchdog:
    """Ends this rank when a stop signal cannot be honoured: the main thread blocked inside a collective
    (`comm.busy_since`) for STUCK_AFTER_SIGNAL_S after the signal, or a second signal arrives.

    Python runs signal handlers only between bytecodes of the main thread, never while it waits inside
    an MPI call, so the handler alone cannot stop a rank stuck in a collective. The interpreter's C-level
    handler still writes each signal's number to the wakeup fd (signal.set_wakeup_fd); this thread reads
    it. Ending the process makes the launcher end the other ranks (nothing is saved: last.npz stays the last
    checkpoint). Install and stop from the main thread, with Python-level handlers for the signals.
    """

    def __init__(self, comm, grace=None):
        self.comm = comm
        self.grace = STUCK_AFTER_SIGNAL_S if grace is None else float(grace)
        self._recv, self._send = socket.socketpair()
        self._recv.setblocking(False)
        self._send.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._send.fileno(), warn_on_full_buffer=False)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="chexcy-signal-watchdog", daemon=True)
        self._thread.start()

    def _watch(self):
        count, signum, first = 0, None, None
        while not self._done.is_set():
            ready, _, _ = select.select([self._recv], [], [], 0.2)
            if ready:
                try:
                    data = self._recv.recv(64)
                except BlockingIOError:
                    data = b""
                for number in data:
                    if number not in (signal.SIGINT, signal.SIGTERM):
                        continue        # other signals with Python handlers are none of our business
                    count, signum = count + 1, number
                    first = first or time.monotonic()
            if signum is None:
                continue
            if count >= 2:
                self._end(signum, "a second signal arrived")
            busy = getattr(self.comm, "busy_since", None)
            if busy is not None and time.monotonic() - max(first, busy) > self.grace:
                self._end(signum, f"this rank stayed blocked in a collective for {self.grace:g} s after it (another "
                                  f"rank is not taking part)")

    def _end(self, signum, why):
        name = signal.Signals(signum).name
        print(f"chexcy: rank {self.comm.rank} of {self.comm.size}: {name} received and {why}: ending now without "
              f"saving (the last checkpoint written stays)", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def stop(self):
        self._done.set()
        self._thread.join()
        signal.set_wakeup_fd(self._previous_fd)
        self._recv.close()
        self._send.close()


# ---------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------

def shard_bounds(n, rank, size):
    """(lo, hi): rank `rank`'s contiguous part of n items split over `size` ranks.

    The first n % size ranks take n // size + 1 items, the others n // size; the parts of ranks
    0..size-1 are adjacent and cover [0, n) exactly, so concatenating per-rank results in rank order
    restores the original order.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard_bounds: need 0 <= rank < size, got rank={rank}, size={size}")
    if n < 0:
        raise ValueError(f"shard_bounds: n must be >= 0, got {n}")
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard(indices, comm):
    """This rank's contiguous slice of `indices` (1-D, e.g. the rows of one global batch)."""
    lo, hi = shard_bounds(len(indices), comm.rank, comm.size)
    return indices[lo:hi]


# ---------------------------------------------------------------------------------------------------
# Gradient averaging: one Allreduce per step
# ---------------------------------------------------------------------------------------------------

StepTotals = collections.namedtuple("StepTotals", "loss weight rows stop")
StepTotals.__doc__ = """What every rank knows after a step's Allreduce: the global mean loss, the global weight
(terms of the loss), the rows of the global batch, and whether any rank asked to stop."""


class GradientAllreduce:
    """Averages the gradients of `params` over ranks with one Allreduce on one flat float32 buffer.

    params: a list of objects with `.data` and `.grad` (float32 ndarrays of the same shape). The buffer
    holds P gradient scalars followed by four numbers: weighted loss, weight, rows, stop flag. It is
    allocated once; `views[i]` is the slice of the buffer shaped like params[i].grad.

    `__call__(loss, weight, stop=False, rows=0)` -> StepTotals(loss, weight, rows, stop):
        loss   : this rank's mean loss (a float; the mean over `weight` terms)
        weight : how many terms that mean averaged (present labels for the masked BCE; rows for a plain
                 batch mean). 0 is allowed (an empty shard or all labels masked): the rank then adds
                 nothing, whatever its gradient holds.
        stop   : this rank wants to stop after this step (a signal arrived); the result tells every rank.
        rows   : this rank's batch rows (summed, for images/s of the whole job).
    On return each `.grad` is `views[i]`, holding sum_r(w_r * g_r) / sum_r(w_r): the gradient of the global
    mean loss (valid until the next call).
    (float32 holds integers exactly up to 2**24, far above any batch's weight or rows.)
    """
    EXTRA = 4

    def __init__(self, params, comm):
        self.params = list(params)
        self.comm = comm
        sizes = [int(np.asarray(p.data).size) for p in self.params]
        self.n_grad = int(sum(sizes))
        self.buffer = np.zeros(self.n_grad + self.EXTRA, dtype=np.float32)
        self.views = []
        offset = 0
        for p, n in zip(self.params, sizes):
            self.views.append(self.buffer[offset:offset + n].reshape(np.shape(p.data)))
            offset += n
        self.calls = 0

    @property
    def nbytes(self):
        """Bytes each rank contributes to the Allreduce per step."""
        return self.buffer.nbytes

    def __call__(self, loss, weight, stop=False, rows=0):
        weight = float(weight)
        buf = self.buffer
        if weight > 0:
            for p, view in zip(self.params, self.views):
                if p.grad is None:
                    view[...] = 0.0
                else:
                    np.multiply(p.grad, np.float32(weight), out=view)
            buf[-4] = loss * weight
        else:
            buf[:-3] = 0.0                 # NaN * 0 would still poison the sum
        buf[-3] = weight
        buf[-2] = rows
        buf[-1] = 1.0 if stop else 0.0
        self.comm.allreduce_sum_(buf)
        self.calls += 1
        total = float(buf[-3])
        if total > 0:
            buf[:self.n_grad] *= np.float32(1.0 / total)
            global_loss = float(buf[-4]) / total
        else:
            buf[:self.n_grad] = 0.0
            global_loss = float("nan")
        # Each .grad becomes its view of the buffer: no copy back. Backward sets fresh arrays (it never
        # accumulates into .grad), so the next step's packing cannot clobber a gradient still in use.
        for p, view in zip(self.params, self.views):
            p.grad = view
        return StepTotals(global_loss, total, int(buf[-2]), bool(buf[-1] > 0))


def broadcast_arrays(arrays, comm, root=0):
    """Overwrite every ndarray in `arrays` with root's values (in place; one Bcast per dtype group).

    Used once at start so every rank begins from identical parameters (and BatchNorm buffers),
    whatever each rank's random initialisation produced.
    """
    arrays = list(arrays)
    if comm.size == 1 or not arrays:
        return
    for dtype in sorted({a.dtype.str for a in arrays}):
        group = [a for a in arrays if a.dtype.str == dtype]
        flat = np.concatenate([a.ravel() for a in group])
        comm.bcast_(flat, root=root)
        offset = 0
        for a in group:
            a[...] = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size


def broadcast_parameters(params, comm, root=0):
    """`broadcast_arrays` over the `.data` of parameter objects."""
    broadcast_arrays([p.data for p in params], comm, root=root)


def gather_rows(local, comm):
    """Concatenate each rank's (n_r, ...) array along axis 0 in rank order on rank 0; None elsewhere.

    With `shard_bounds` slices this restores the original row order (e.g. validation predictions).
    """
    return comm.gatherv_rows(local)


# ---------------------------------------------------------------------------------------------------
# BatchNorm with the statistics of the whole global batch
# ---------------------------------------------------------------------------------------------------

def _sync_batchnorm_class():
    """SyncBatchNorm2d, built on first use so that importing this module does not import chexcy.nn."""
    global SyncBatchNorm2d
    if SyncBatchNorm2d is not None:
        return SyncBatchNorm2d
    from chexcy.nn.layers import BatchNorm2d

    class _SyncBatchNorm2d(BatchNorm2d):
        """BatchNorm2d whose training statistics are those of the global batch over all ranks.

        Forward (training): the per-channel mean from Allreduce(sum x, count), then the variance from
        Allreduce(sum (x - mean)^2): the same two-pass formula one process uses, so the normalised
        activations, and the running mean/var (identical on every rank, no extra syncing), equal a
        single process's on the whole batch to float32 rounding.
        Backward: dx needs the global sums of dout and dout * xhat. Gradients here are in this rank's
        units (the rank's loss is a mean over its own `loss_weight` = w_r terms, while the global loss
        is a mean over W = sum w_r), so the sums are taken of w_r * dout (W cancels out of dx: see
        below); dweight/dbias stay local sums, which GradientAllreduce then weights by w_r like every
        other gradient. A rank with w_r = 0 contributes nothing through this layer (documented).
        Eval mode is plain BatchNorm2d with the (shared) running statistics.
        """
        comm = LocalComm()
        loss_weight = 1.0

        def forward(self, x):
            if not self.training:
                return super().forward(x)
            if x.ndim != 4 or x.shape[1] != self.num_features:
                raise ValueError(f"SyncBatchNorm2d: expected (N, {self.num_features}, H, W), got {x.shape}")
            dtype = x.dtype
            C = self.num_features
            stats = np.empty(C + 1, np.float64)
            stats[:C] = x.sum(axis=(0, 2, 3), dtype=np.float64)
            stats[C] = x.shape[0] * x.shape[2] * x.shape[3]
            self.comm.allreduce_sum_(stats)
            count = stats[C]
            if count < 2:
                raise ValueError(f"SyncBatchNorm2d: training needs more than one value per channel over all "
                                 f"ranks, got {int(count)} (local input {x.shape})")
            mean = (stats[:C] / count).astype(dtype)
            xhat = x - mean[:, None, None]
            sq = np.einsum("nchw,nchw->c", xhat, xhat).astype(np.float64)
            self.comm.allreduce_sum_(sq)
            var = (sq / count).astype(dtype)
            inv_std = 1.0 / np.sqrt(var + dtype.type(self.eps))
            xhat *= inv_std[:, None, None]
            self._xhat, self._inv_std, self._count = xhat, inv_std, count
            m = self.momentum
            self.running_mean *= (1 - m)
            self.running_mean += (m * mean).astype(np.float32)
            self.running_var *= (1 - m)
            self.running_var += (m * var * (count / (count - 1))).astype(np.float32)
            gamma = self.weight.data.astype(dtype, copy=False)[:, None, None]
            beta = self.bias.data.astype(dtype, copy=False)[:, None, None]
            return xhat * gamma + beta

        def backward(self, dout):
            # With dout_r = (W / w_r) * g_r (g the gradient of the global loss on this rank's rows):
            #   g_dx = gamma * inv_std * (g - sum(g) / n - xhat * sum(g * xhat) / n)   (sums over all ranks)
            #   dx_r = (W / w_r) * g_dx = gamma * inv_std * (dout_r - S_b / (w_r n) - xhat * S_g / (w_r n))
            # where S_b = sum_r w_r sum(dout_r), S_g = sum_r w_r sum(dout_r * xhat): W never appears.
            xhat, inv_std, count = self._xhat, self._inv_std, self._count
            C = self.num_features
            dbeta = dout.sum(axis=(0, 2, 3))
            dgamma = np.einsum("nchw,nchw->c", dout, xhat)
            self.weight.grad, self.bias.grad = dgamma, dbeta
            w = float(self.loss_weight)
            sums = np.empty(2 * C, np.float64)
            sums[:C] = dbeta
            sums[C:] = dgamma
            sums *= w
            self.comm.allreduce_sum_(sums)
            if w <= 0:
                return np.zeros_like(dout)
            mean_b = (sums[:C] / (w * count)).astype(dout.dtype)
            mean_g = (sums[C:] / (w * count)).astype(dout.dtype)
            gamma = self.weight.data.astype(dout.dtype, copy=False)
            dx = xhat * (-mean_g)[:, None, None]
            dx += dout
            dx -= mean_b[:, None, None]
            dx *= (gamma * inv_std)[:, None, None]
            return dx

    _SyncBatchNorm2d.__name__ = _SyncBatchNorm2d.__qualname__ = "SyncBatchNorm2d"
    SyncBatchNorm2d = _SyncBatchNorm2d
    return SyncBatchNorm2d


SyncBatchNorm2d = None


def convert_sync_batchnorm(model, comm):
    """Turn every BatchNorm2d of `model` into a SyncBatchNorm2d on `comm`, in place. Returns the layers.

    Only the class of each layer changes (parameters, buffers and state_dict names stay), so
    checkpoints move freely between distributed and single-process runs.
    """
    from chexcy.nn.layers import BatchNorm2d
    cls = _sync_batchnorm_class()
    converted = []
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.__class__ = cls
            m.comm = comm
            converted.append(m)
    return converted


# ---------------------------------------------------------------------------------------------------
# The training loop's view of all of the above
# ---------------------------------------------------------------------------------------------------

def present_labels(labels, mask=None):
    """How many (row, label) terms a masked mean loss averages over: labels not NaN and mask > 0."""
    present = ~np.isnan(np.asarray(labels, dtype=np.float32))
    if mask is not None:
        present &= np.asarray(mask) > 0
    return int(np.count_nonzero(present))


class DataParallel:
    """Data-parallel training of `model` over `comm`: the few calls a training loop makes.

        dp = DataParallel(model, comm)       # SyncBatchNorm, sharded Dropout, identical start, one buffer
        for batch in loader (sharded):       # each rank: its slice of the global batch
            dp.begin_step(weight, n_global)  # weight = present_labels(batch.labels, batch.mask)
            loss = forward + backward        # this rank's mean loss over its `weight` terms
            totals = dp.end_step(loss, weight, rows, stop=signal_seen)  # ONE Allreduce: grads, loss, stop
            optimiser.step()                 # identical on every rank, so parameters stay identical

    `n_global` is the number of rows of the global batch (this rank holds rows shard_bounds(n_global)).
    It lets Dropout draw the mask of the whole global batch from the step's generator and keep this
    rank's rows, so that dropout too matches one process on the whole batch.
    With a LocalComm every call is (almost) free and nothing changes numerically.
    """

    def __init__(self, model, comm, broadcast=True):
        self.model = model
        self.comm = comm
        self.sync_bn = convert_sync_batchnorm(model, comm) if comm.size > 1 else []
        self.dropout = convert_sharded_dropout(model, comm) if comm.size > 1 else []
        if broadcast and comm.size > 1:
            broadcast_arrays([p.data for p in model.parameters()]
                             + [b for _, b in model.named_buffers()], comm)
        self.reducer = GradientAllreduce(model.parameters(), comm)

    # -- the training loop's hooks (chexcy.train.fit) -------------------------------------------------
    def attach(self, loader):
        """Make `loader` yield this rank's rows of every global batch (BatchLoader / StudyLoader).

        Every global batch must give each rank at least one row (SyncBatchNorm and the kernels need a
        non-empty batch): batch_size >= K, and a last, shorter batch of an epoch must hold >= K rows.
        """
        k = self.comm.size
        n, b = loader.n_items, loader.batch_size
        last = 0 if loader.drop_last else n % b
        if b < k or 0 < last < k:
            raise ValueError(
                f"--distributed: with {k} ranks every global batch needs at least {k} rows, but batch size {b} "
                f"over {n} items gives " + (f"batches of {b}" if b < k else f"a last batch of {last}") +
                "; choose another --batch-size (or fewer ranks)")
        self.loader = loader
        loader.shard = self.shard_positions
        return loader

    def shard_positions(self, positions):
        """This rank's contiguous part of one global batch (positions in the loader's item list)."""
        return shard(positions, self.comm)

    def global_rows(self, step):
        """Rows of global batch number `step` of an epoch of the attached loader."""
        b = self.loader.batch_size
        return int(min(b, self.loader.n_items - step * b))

    def catch_signals(self):
        """SIGINT/SIGTERM only note the signal; `stop_signal` turns it into a decision all ranks share.

        A rank must never stop on its own (the others would wait in the next Allreduce), so the signal
        travels in the step's Allreduce buffer and every rank stops after the same step. A second signal
        restores the previous handler and re-raises (for a hung step); a SignalWatchdog ends a rank that
        is blocked in a collective and cannot run the handler at all.
        """
        self.pending_signal = None
        self._previous_handlers = {}

        def handle(signum, frame):
            if self.pending_signal is not None:
                signal.signal(signum, self._previous_handlers.get(signum, signal.SIG_DFL))
                os.kill(os.getpid(), signum)
                return
            self.pending_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, handle)
        self._watchdog = SignalWatchdog(self.comm) if self.comm.size > 1 else None

    def restore_signals(self):
        """Put back the handlers `catch_signals` replaced (when training ends)."""
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.stop()
            self._watchdog = None
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def stop_signal(self, totals=None):
        """The signal to stop on, identical on every rank (None: go on).

        totals: the StepTotals of the step just done (its stop flag is already global); without it, one
        small Allreduce asks every rank (used between epochs)."""
        stop = totals.stop if totals is not None else self.any(self.pending_signal is not None)
        if not stop:
            return None
        return self.pending_signal or signal.SIGTERM

    def begin_batch(self, batch, step):
        """Before forward: tell SyncBatchNorm this rank's loss weight and Dropout the global batch size."""
        self.weight = present_labels(batch.labels, batch.mask)
        self.rows = int(len(batch.labels))
        self.begin_step(self.weight, self.global_rows(step))

    def end_batch(self, loss):
        """After backward: the step's one Allreduce. Returns StepTotals (global loss, weight, rows, stop)."""
        stop = getattr(self, "pending_signal", None) is not None
        return self.end_step(loss, self.weight, rows=self.rows, stop=stop)

    def any(self, flag):
        """True on every rank when `flag` is true on any rank (e.g. a signal seen during validation)."""
        return self.comm.allreduce_sum(1 if flag else 0) > 0

    def predict(self, dataset, batch_size=64, pos_weight=None):
        """chexcy.evaluate.predict_dataset over all ranks: each rank scores its part of every batch, the
        scores are gathered on rank 0 (Gatherv), put back in row order, and shared with every rank, so
        the AUC (and which checkpoint is best) is that of the whole set and the same everywhere."""
        from chexcy.evaluate import Predictions
        from chexcy.nn import bce_with_logits, sigmoid
        from chexcy.train import make_loader
        model = self.model
        model.eval()
        loader = make_loader(model, dataset, batch_size, shuffle=False, seed=0, augment=False)
        loader.shard = self.shard_positions
        logits, labels, groups = [np.zeros((0, 14))], [np.zeros((0, 14))], [np.zeros(0, np.int64)]
        for batch in loader.batches(0):
            if len(batch.labels) == 0:          # a batch smaller than the number of ranks
                continue
            logits.append(np.asarray(model.forward_batch(batch), dtype=np.float64))
            labels.append(np.where(np.asarray(batch.mask) > 0, batch.labels, np.nan).astype(np.float64))
            groups.append(np.asarray(batch.index if model.input_kind == "image" else batch.study_rows, np.int64))
        parts = [gather_rows(np.concatenate(a), self.comm) for a in (logits, labels, groups)]
        parts = self.comm.bcast_object(parts)
        all_logits, all_labels, all_groups = parts
        order = np.argsort(all_groups, kind="stable")    # the order one process would produce
        all_logits, all_labels, all_groups = all_logits[order], all_labels[order], all_groups[order]
        loss, _ = bce_with_logits(all_logits, all_labels, pos_weight=pos_weight)
        return Predictions(sigmoid(all_logits), all_labels, loss, all_groups, model.input_kind)

    def begin_step(self, weight, n_global=None):
        for m in self.sync_bn:
            m.loss_weight = float(weight)
        for m in self.dropout:
            m.global_rows = n_global

    def end_step(self, loss, weight, rows=0, stop=False):
        """Average gradients (one Allreduce). Returns StepTotals(global mean loss, weight, rows, stop)."""
        return self.reducer(loss, weight, stop=stop, rows=rows)


def convert_sharded_dropout(model, comm):
    """Make every Dropout of `model` draw the global batch's mask and keep this rank's rows (in place)."""
    from chexcy.nn.layers import Dropout

    class ShardedDropout(Dropout):
        """Dropout whose mask is the slice, for this rank's rows, of the mask one process would draw for
        the whole global batch (`global_rows` rows) from the same generator. Costs a mask of the global
        batch's size: dropout sits on small feature vectors, so this is cheap."""
        global_rows = None

        def forward(self, x):
            if not self.training or self.p == 0.0 or self.global_rows is None:
                return super().forward(x)
            lo, hi = shard_bounds(int(self.global_rows), self.comm.rank, self.comm.size)
            if hi - lo != x.shape[0]:
                raise ValueError(f"Dropout: this rank holds {x.shape[0]} rows but its shard of a global batch of "
                                 f"{self.global_rows} is {hi - lo}")
            keep = self.rng.random((int(self.global_rows),) + x.shape[1:], dtype=np.float32)[lo:hi] >= self.p
            self._mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
            return x * self._mask

    converted = []
    for m in model.modules():
        if type(m) is Dropout:
            m.__class__ = ShardedDropout
            m.comm = comm
            converted.append(m)
    return converted
