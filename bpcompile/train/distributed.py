"""Data-parallel training over MPI: N processes, each given a slice of every batch, train the
model one process would train on the whole batch.

    import bpcompile as bp
    bp.distributed.init()                      # under `mpiexec -n N python train.py`, or alone
    dp = bp.distributed.DataParallel(model)    # parameters and optimizer state from rank 0
    dp.fit(data, epochs=5, batch_size=256)     # each global batch split across the ranks

A step is two native calls around one MPI call: `model.backward` writes the local gradients into
the model's flat gradient buffer; each rank scales its part by its share of the global batch
rows, one in-place `Allreduce` sums the buffer (the span of the loss's parameters, no copy); then
`model.apply_gradients` runs the fused update (global clip_norm, weight decay, schedule) on the
same reduced gradient on every rank, so the parameters stay identical. Before that, a 3-number
allreduce carries each rank's status and rows, so an exception on one rank (bad input) makes
every rank raise `DistributedError` naming it instead of leaving the others waiting.

Batch norm uses each rank's local batch statistics (as PyTorch DDP without SyncBatchNorm); the
running statistics are averaged across ranks at the end of each epoch of `fit` and before
`evaluate`, `predict` and `save`. Dropout draws a distinct stream on each rank.

mpi4py is the optional extra `bpcompile[mpi]` (mpi4py and the `mpich` wheel; a system MPI works
as well). Without it, `init()` in a plain process gives a world of one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BPError, InputError
from .fit import _dataset, predict

SEED_STRIDE = 1 << 32  # rank r draws dropout from seed + r * SEED_STRIDE: rank 0 keeps the model's stream
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")
_WORLD: Any = None


class DistributedError(BPError):
    """A step failed on some rank; raised on every rank, naming the ranks and their messages."""


class _SingleProcess:
    """The communicator of a world of one, for a process started without MPI and without mpi4py."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Allreduce(self, sendbuf: Any, recvbuf: Any = None, op: Any = None) -> None:
        if recvbuf is not None and sendbuf is not _IN_PLACE:
            np.copyto(recvbuf, sendbuf)

    def Bcast(self, buf: Any, root: int = 0) -> None:
        pass

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def Barrier(self) -> None:
        pass

    def Abort(self, code: int = 1) -> None:
        os._exit(code)


_IN_PLACE = object()  # MPI.IN_PLACE where mpi4py is present


def _launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


def _mpi() -> Any:
    """mpi4py's MPI module, or None in a plain process without it."""
    try:
        from mpi4py import MPI
    except ImportError:
        if _launched_by_mpi():
            raise ImportError("this process was started by an MPI launcher, but mpi4py is not installed: "
                              "pip install 'bpcompile[mpi]'") from None
        return None
    return MPI


def init() -> Any:
    """Join the MPI world (idempotent) and return its communicator; a plain process is a world of
    one. An exception that escapes the script on one rank aborts the whole job (so no rank waits
    forever in a collective call for a rank that has died)."""
    global _WORLD, _IN_PLACE
    if _WORLD is not None:
        return _WORLD
    MPI = _mpi()
    if MPI is None:
        _WORLD = _SingleProcess()
        return _WORLD
    _IN_PLACE = MPI.IN_PLACE
    _WORLD = MPI.COMM_WORLD
    if _WORLD.Get_size() > 1:
        _abort_on_uncaught_exceptions(_WORLD)
    return _WORLD


def _abort_on_uncaught_exceptions(comm: Any) -> None:
    previous = sys.excepthook

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stderr.write(f"bpcompile.distributed: rank {comm.Get_rank()} of {comm.Get_size()} ended with "
                         f"{kind.__name__}; aborting the job\n")
        sys.stderr.flush()
        comm.Abort(1)

    sys.excepthook = hook


def rank() -> int:
    """This process's rank in the world (0 in a plain process)."""
    return init().Get_rank()


def world_size() -> int:
    """The number of processes in the world (1 in a plain process)."""
    return init().Get_size()


def _sum_op() -> Any:
    MPI = _mpi()
    return None if MPI is None else MPI.SUM


def _shard(n: int, size: int, rank: int) -> slice:
    """Rank `rank`'s contiguous part of `n` rows split as evenly as possible (first ranks get more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class DataParallel:
    """Train `model` on a slice of every batch per process, as one process on the whole batch.

    The loss is taken to be a mean over the batch rows (every bpcompile loss is); each rank's
    gradient is weighted by its rows, so unequal slices give the global-batch mean exactly. Pass
    reduction="sum" for a loss that sums over rows."""

    def __init__(self, model: Any, comm: Any = None, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if model.optimizer is None:
            raise InputError(f"model {model.name!r} was compiled without an optimizer; DataParallel trains it")
        self.model = model
        self.comm = comm if comm is not None else init()
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.reduction = reduction
        self._sum = _sum_op()
        self._spans = {spec["name"]: self._span(spec["params"]) for spec in model.meta["losses"]}
        self._running = [model.params[p["name"]] for p in model.meta["params"] if not p["trainable"]]
        self._check_same_model()
        model._grads_flat[...] = 0  # the padding between parameters is reduced too: keep it finite
        self.broadcast_from(0)
        model.seed = model.seed + self.rank * SEED_STRIDE  # distinct dropout streams
        model._tls = threading.local()  # call frames carry the seed
        self.allreduce_seconds = 0.0  # time spent in the gradient Allreduce (bench/dist_bench.py)

    # --- set-up ------------------------------------------------------------------------------
    def _span(self, names: list[str]) -> slice:
        """The smallest slice of the flat gradient buffer that holds the gradients of `names`."""
        layout = {p["name"]: p for p in self.model.meta["params"]}
        starts = [layout[n]["offset"] for n in names]
        stops = [layout[n]["offset"] + int(np.prod(layout[n]["shape"], dtype=np.int64)) for n in names]
        return slice(min(starts), max(stops)) if names else slice(0, 0)

    def _check_same_model(self) -> None:
        mine = (self.model._signature(), self.model.meta["param_size"])
        theirs = self.comm.allgather(mine)
        wrong = [r for r, sig in enumerate(theirs) if sig != theirs[0]]
        if wrong:
            raise DistributedError(f"ranks {wrong} compiled a different model than rank 0 "
                                   f"({theirs[wrong[0]][0]} vs {theirs[0][0]}); every rank must build the same graph, "
                                   "dtype and optimizer")

    def broadcast_from(self, root: int = 0) -> None:
        """Give every rank the parameters, optimizer state and step count of rank `root`."""
        model = self.model
        self.comm.Bcast(model._params_flat, root=root)
        self.comm.Bcast(model._state_flat, root=root)
        step, loss_steps = self.comm.bcast((model.step, [model.loss_steps[n] for n in model.loss_steps]), root=root)
        model.set_steps(step, loss_steps)

    # --- one step ----------------------------------------------------------------------------
    def _rows(self, batch: Mapping[str, Any]) -> int:
        """The batch rows of this rank's slice: the length of the first input with a runtime first dim."""
        for name, value in batch.items():
            spec = self.model._inputs.get(name)
            if spec is not None and spec["shape"] and isinstance(spec["shape"][0], str):
                return len(value)
        raise InputError(f"train_step: none of the inputs {list(batch)} has a runtime batch dimension to weight "
                         "the ranks' gradients by")

    def _agree(self, failure: BaseException | None, numbers: list[float]) -> np.ndarray:
        """Allreduce [failed ranks, *numbers]; if any rank failed, raise on every rank, naming them."""
        status = np.array([1.0 if failure is not None else 0.0, *numbers], dtype=np.float64)
        self.comm.Allreduce(_IN_PLACE, status, op=self._sum)
        if status[0] > 0:
            message = None if failure is None else f"{type(failure).__name__}: {failure}"
            failed = [(r, m) for r, m in enumerate(self.comm.allgather(message)) if m is not None]
            text = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise DistributedError(f"{len(failed)} of {self.world_size} ranks failed the step ({text})") from failure
        return status[1:]

    def train_step(self, loss: str | None = None, lr: float | None = None, **local_batch: Any) -> float:
        """One step on the global batch made of every rank's `local_batch` (which may be empty on
        some ranks, or of unequal sizes); returns the global mean loss, the same on every rank."""
        model = self.model
        failure, value, rows = None, 0.0, 0
        try:
            name = model._loss_spec(loss)["name"]
            span = model._grads_flat[self._spans[name]]
            rows = self._rows(local_batch)
            if rows:
                value = model.backward(loss=loss, **local_batch)
            else:
                span[...] = 0
        except Exception as e:  # every rank learns of it in _agree, none waits in the Allreduce below
            failure = e
        total_rows, total = self._agree(failure, [rows, value * rows])
        if total_rows == 0:
            raise InputError("train_step: every rank's batch is empty")
        if self.reduction == "mean":
            span *= rows / total_rows
        start = time.perf_counter()
        self.comm.Allreduce(_IN_PLACE, span, op=self._sum)
        self.allreduce_seconds += time.perf_counter() - start
        model.apply_gradients(loss=loss, lr=lr)
        return float(total / total_rows) if self.reduction == "mean" else float(total)

    def sync_running_statistics(self) -> None:
        """Average the batch-norm running statistics over the ranks (each rank tracked its own)."""
        for array in self._running:
            self.comm.Allreduce(_IN_PLACE, array, op=self._sum)
            array /= self.world_size

    # --- datasets --------------------------------------------------------------------------
    def fit(self, data: Mapping[str, Any], epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
            seed: int = 0, validation: Mapping[str, Any] | None = None, loss: str | None = None,
            verbose: bool = True, checkpoint: str | os.PathLike | None = None) -> dict[str, list[float]]:
        """`model.fit` across the ranks: every rank holds the whole dataset and draws the same
        shuffled order; each global batch of `batch_size` rows is split into one contiguous slice
        per rank, so N ranks train what one process trains with the same arguments. Rank 0 prints
        the progress and writes the checkpoint (if given) after each epoch."""
        from .fit import fit
        return fit(self.model, data, epochs=epochs, batch_size=batch_size, shuffle=shuffle, seed=seed,
                   validation=validation, loss=loss, verbose=verbose, checkpoint=checkpoint, parallel=self)

    def epoch_batches(self, arrays: Mapping[str, np.ndarray], order: np.ndarray, batch_size: int):
        """This rank's part of each global batch of `order`, with the global batch's rows: the
        epoch's rows of this rank are taken in one copy, then sliced."""
        parts, sizes = [], []
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            parts.append(batch[_shard(len(batch), self.world_size, self.rank)])
            sizes.append((len(parts[-1]), len(batch)))
        mine = {k: np.take(v, np.concatenate(parts), axis=0) for k, v in arrays.items()}
        offset = 0
        for rows, global_rows in sizes:
            yield {k: v[offset:offset + rows] for k, v in mine.items()}, global_rows
            offset += rows

    def _my_shard(self, data: Mapping[str, Any], what: str) -> tuple[dict[str, np.ndarray], int]:
        arrays, n = _dataset(self.model, data, what)
        part = _shard(n, self.world_size, self.rank)
        return {k: v[part] for k, v in arrays.items()}, n

    def evaluate(self, data: Mapping[str, Any], batch_size: int = 256, loss: str | None = None) -> dict[str, float]:
        """`model.evaluate` over the whole dataset, each rank taking a contiguous part; the same
        metrics on every rank."""
        self.sync_running_statistics()
        shard, n = self._my_shard(data, "evaluate")
        rows = len(next(iter(shard.values())))
        names = ["loss"] + (["accuracy"] if self.model._loss_spec(loss).get("classifier") else [])
        failure, metrics = None, {}
        try:
            metrics = self.model.evaluate(shard, batch_size=batch_size, loss=loss) if rows else {}
        except Exception as e:
            failure = e
        sums = self._agree(failure, [metrics.get(k, 0.0) * rows for k in names])
        return {k: float(s / n) for k, s in zip(names, sums)}

    def predict(self, data: Mapping[str, Any], batch_size: int = 256):
        """`model.predict` over the whole dataset, each rank taking a contiguous part; every rank
        gets all the outputs (a dict, as `forward` returns), in the dataset's order."""
        self.sync_running_statistics()
        shard, _ = self._my_shard(data, "predict")
        rows = len(next(iter(shard.values())))
        failure, out = None, None
        try:
            out = predict(self.model, shard, batch_size=batch_size) if rows else None
        except Exception as e:
            failure = e
        self._agree(failure, [])
        parts = [p for p in self.comm.allgather(out) if p is not None]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Rank 0 writes the checkpoint (atomically, as `model.save`); every rank returns once it
        is written, or raises if writing failed."""
        self.sync_running_statistics()
        failure = None
        if self.rank == 0:
            try:
                self.model.save(path)
            except Exception as e:
                failure = e
        self._agree(failure, [])

    def load(self, path: str | os.PathLike) -> None:
        """Rank 0 reads the checkpoint (written by any number of ranks) and gives it to every rank."""
        failure = None
        if self.rank == 0:
            try:
                self.model.load(Path(path))
            except Exception as e:
                failure = e
        self._agree(failure, [])
        self.broadcast_from(0)

