"""Data-parallel training over a communicator (chexcy.comm): replicas, the gradient Allreduce, the stop request.

The communicators themselves (LocalComm, MPIComm, init, shard_bounds) live in chexcy.comm; chexcy.distributed
re-exports both modules. Only `--distributed` imports mpi4py; plain chexcy never does. Every helper also works
with `LocalComm`, a one-process stand-in, so the training and preparation code has a single path
whatever the number of ranks.

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
- BatchNorm: synchronised batch statistics (chexcy.nn.BatchNorm2d given the communicator): in training
  mode every rank's per-plane statistics are gathered and combined in batch order (forward), and the
  per-channel gradient sums are summed over ranks (backward), through the backend's kernels. So
  normalisation uses the statistics of the whole global batch and the running mean/var are identical on
  every rank. This is the choice that makes "K ranks x B/K == 1 process x B" hold (to float32 rounding);
  its cost per BatchNorm layer and step is one allgather of 2 x C x B_r float64 and one Allreduce of 2C.
- Dropout: each rank applies its rows of the mask drawn for the whole global batch (chexcy.nn.Dropout
  given the communicator and the global batch's rows).
- Validation: each rank scores its part of every validation batch (chexcy.scoring.predict_dataset);
  `gather_rows` (Gatherv) brings the scores to rank 0, they are put back in row order and shared, so
  the AUC is that of the whole set.
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
import os
import select
import signal
import socket
import sys
import threading
import time

import numpy as np

from chexcy.comm import shard

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
        if self.comm.size == 1:            # one rank: its gradients and loss are already the global ones
            self.calls += 1
            return StepTotals(float(loss), weight, int(rows), bool(stop))
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

        dp = DataParallel(model, comm)       # layers given comm, identical start, one buffer
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
        from chexcy.nn.layers import BatchNorm2d, Dropout
        # The layers own their math: given the communicator, BatchNorm2d uses the global batch's statistics
        # and Dropout the global batch's mask (identity when comm has one rank).
        self.sync_bn = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
        self.dropout = [m for m in model.modules() if isinstance(m, Dropout)]
        for m in self.sync_bn + self.dropout:
            m.comm = comm
        if broadcast and comm.size > 1:
            broadcast_arrays([p.data for p in model.parameters()]
                             + [b for _, b in model.named_buffers()], comm)
        self.reducer = GradientAllreduce(model.parameters(), comm)

    # -- the training loop's hooks (chexcy.train.fit) -------------------------------------------------
    def attach(self, loader):
        """Make `loader` yield this rank's rows of every global batch (BatchLoader / StudyLoader).

        Every global batch must give each rank at least one row (synchronised BatchNorm and the kernels need a
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
        if k > 1:
            loader.shard = self.shard_positions
        return loader

    def shard_positions(self, positions):
        """This rank's contiguous part of one global batch (positions in the loader's item list)."""
        return shard(positions, self.comm)

    def global_rows(self, step):
        """Rows of global batch number `step` of an epoch of the attached loader."""
        b = self.loader.batch_size
        return int(min(b, self.loader.n_items - step * b))

    def begin_batch(self, batch, step):
        """Before forward: tell BatchNorm this rank's loss weight and Dropout the global batch size."""
        self.weight = present_labels(batch.labels, batch.mask)
        self.rows = int(len(batch.labels))
        self.begin_step(self.weight, self.global_rows(step))

    def end_batch(self, loss, stop=False):
        """After backward: the step's one Allreduce (gradients, loss, rows and this rank's wish to stop).
        Returns StepTotals (global loss, weight, rows, stop on any rank)."""
        return self.end_step(loss, self.weight, rows=self.rows, stop=stop)

    def begin_step(self, weight, n_global=None):
        for m in self.sync_bn:
            m.loss_weight = float(weight)
        for m in self.dropout:
            m.global_rows = n_global

    def end_step(self, loss, weight, rows=0, stop=False):
        """Average gradients (one Allreduce). Returns StepTotals(global mean loss, weight, rows, stop)."""
        return self.reducer(loss, weight, stop=stop, rows=rows)


class StopRequest:
    """SIGINT/SIGTERM as a stop request that every rank honours after the same step (the one handler of
    `chexcy train`, for one process and K ranks alike).

        with StopRequest(comm) as stop:
            ... stop.seen ...                  # this rank's signal, if any (send it in the step's Allreduce)
            stop.decide(totals.stop)           # the decision all ranks share -> stop.signal (None: go on)

    A signal only notes itself: a rank must never stop on its own (the others would wait in the next
    collective). A second signal falls back to the default behaviour (for a step that hangs). With K > 1 a
    SignalWatchdog also ends a rank blocked in a collective, where Python cannot run the handler at all.
    enabled=False (or off the main thread) installs nothing: `seen` stays None.
    """

    def __init__(self, comm, enabled=True):
        self.comm = comm
        self.seen = None
        self.signal = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous = {}
        self._watchdog = None

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
            if self.comm.size > 1:
                self._watchdog = SignalWatchdog(self.comm)
        return self

    def _handle(self, signum, frame):
        if self.seen is not None:
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
            os.kill(os.getpid(), signum)
            return
        self.seen = signum

    def decide(self, any_rank=None):
        """Set and return `signal`, the same on every rank: the signal to stop on, or None.

        any_rank: whether some rank saw a signal, when a collective already told (the step's Allreduce);
        None asks every rank with one small Allreduce (between epochs)."""
        if any_rank is None:
            any_rank = self.comm.allreduce_sum(1 if self.seen is not None else 0) > 0
        self.signal = (self.seen or signal.SIGTERM) if any_rank else None
        return self.signal

    def __exit__(self, *exc):
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
