"""Running chexcy as an MPI job: one failing rank ends the job (abort_on_error, install_excepthook), and
threads per rank. The communicators live in chexcy.comm and the data-parallel pieces in chexcy.parallel
(see its docstring for the scheme); both are re-exported here, so `chexcy.distributed` is the one name to
import in an MPI script.
"""
import contextlib
import os
import sys
import time
import traceback

from chexcy.comm import (MPI_EXTRA_HINT, LocalComm, MPIComm, MPIUnavailable, gather_rows,  # noqa: F401
                         import_mpi, init, shard, shard_bounds)
from chexcy.cpus import cores_available
from chexcy.fileio import DiskFullError
from chexcy.parallel import (STUCK_AFTER_SIGNAL_S, DataParallel, GradientAllreduce, SignalWatchdog,  # noqa: F401
                             StepTotals, StopRequest, broadcast_arrays, broadcast_parameters,
                             check_ranks_agree, present_labels, raise_on_every_rank)


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
    cores = cores_available()
    # With a binding launcher (srun --cpu-bind, mpiexec -bind-to core) the affinity already is this
    # rank's share: do not divide it again.
    if cores < (os.cpu_count() or cores):
        return max(1, cores)
    return max(1, cores // local)
