"""Communicators: how ranks talk. `LocalComm` is one process (rank 0 of 1, every collective returns its
input); `MPIComm` wraps mpi4py's COMM_WORLD behind the same interface, so code written against a
communicator has one path whatever the number of ranks. Also the sharding of a batch over ranks
(`shard_bounds`), which the loader, Dropout and the scoring agree on.

Only `init(True)` (`--distributed`) imports mpi4py; plain chexcy never does.
"""
import functools
import os
import time

import numpy as np

MPI_EXTRA_HINT = 'install MPI support: pip install mpi4py mpich (or pip install ".[mpi]" in a chexcy clone)'


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


def gather_rows(local, comm):
    """Concatenate each rank's (n_r, ...) array along axis 0 in rank order on rank 0; None elsewhere.

    With `shard_bounds` slices this restores the original row order (e.g. validation predictions).
    """
    return comm.gatherv_rows(local)
