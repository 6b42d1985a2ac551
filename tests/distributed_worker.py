"""One rank of a data-parallel scenario, run by tests/test_distributed.py as
`mpiexec -n 2 python distributed_worker.py <scenario> <folder>`.

Each rank checks what it can see itself (it also trains the one-process reference, so nothing
travels between ranks but what bp.distributed sends) and prints `rank <r> ok <scenario>`; a
failed check raises, which aborts the job with a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np

import bpcompile as bp
from bpcompile import distributed as dist

STEPS = 20


def mlp(name: str = "dp_mlp") -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 6))
    y = g.input("y", ("batch",), dtype="int32")
    w1, b1 = g.param("W1", (6, 16), init="glorot_uniform"), g.param("b1", (16,))
    w2, b2 = g.param("W2", (16, 4), init="glorot_uniform"), g.param("b2", (4,))
    logits = bp.tanh(x @ w1 + b1) @ w2 + b2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def bn_dropout() -> bp.Graph:
    g = bp.Graph("dp_bn_dropout")
    x = g.input("x", ("batch", 6))
    y = g.input("y", ("batch",), dtype="int32")
    w1 = g.param("W1", (6, 8), init="he_normal")
    gamma, beta = g.param("gamma", (8,), init="ones"), g.param("beta", (8,))
    w2 = g.param("W2", (8, 3), init="glorot_uniform")
    logits = bp.dropout(bp.relu(bp.batch_norm(x @ w1, gamma, beta)), 0.5) @ w2
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def gan() -> bp.Graph:
    g = bp.Graph("dp_gan")
    z = g.input("z", ("batch", 3))
    real = g.input("real", ("batch", 2))
    wg = g.param("Wg", (3, 2), init="normal")
    wd = g.param("Wd", (2, 1), init="normal")
    fake = bp.tanh(z @ wg)
    d_real, d_fake = real @ wd, fake @ wd
    g.loss(bp.mean(bp.softplus(-d_real)) + bp.mean(bp.softplus(d_fake)), name="d", params=["Wd"])
    g.loss(bp.mean(bp.softplus(-d_fake)), name="g", params=["Wg"])
    return g


OPTIMIZERS = {
    "sgd": lambda: bp.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda: bp.optim.Adam(lr=bp.schedules.Cosine(0.01, STEPS), clip_norm=0.5),
}
TOLERANCE = {"float64": dict(rtol=1e-12, atol=1e-14), "float32": dict(rtol=1e-5, atol=1e-6)}


def build_all() -> None:
    """Compile every model the scenarios use (the test does this once, before the ranks start)."""
    for dtype in TOLERANCE:
        for make in OPTIMIZERS.values():
            bp.compile(mlp(), dtype, optimizer=make())
    bp.compile(bn_dropout(), "float64", optimizer=bp.optim.SGD(lr=0.1))
    bp.compile(gan(), "float64", optimizer=bp.optim.Adam(lr=0.05, betas=(0.5, 0.999)))


def data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)), "y": rng.integers(0, 4, n).astype(np.int32)}


def same_params(a, b, tolerance: dict, what: str) -> None:
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], err_msg=f"{what}: {name}", **tolerance)


def same_on_every_rank(model, comm) -> None:
    gathered = comm.allgather(model._params_flat.copy())
    for r, flat in enumerate(gathered):
        np.testing.assert_array_equal(flat, gathered[0], err_msg=f"rank {r}'s parameters differ from rank 0's")


def scenario_exact(comm, folder: Path) -> None:
    """N ranks with 1/N of each batch (equal and unequal slices) == one process on the batch."""
    r = comm.Get_rank()
    for dtype, tolerance in TOLERANCE.items():
        for kind, make in OPTIMIZERS.items():
            for split in ((4, 4), (5, 3)):
                ref = bp.compile(mlp(), dtype, optimizer=make(), seed=r + 1)  # seeds differ: broadcast fixes it
                dp = dist.DataParallel(bp.compile(mlp(), dtype, optimizer=make(), seed=r + 7))
                ref._params_flat[...] = dp.model._params_flat
                for step in range(STEPS):
                    batch = data(sum(split), seed=step)
                    lo = sum(split[:r])
                    mine = {k: v[lo:lo + split[r]] for k, v in batch.items()}
                    expected = ref.train_step(**batch)
                    got = dp.train_step(**mine)
                    np.testing.assert_allclose(got, expected, **tolerance)
                same_params(dp.model, ref, tolerance, f"{dtype} {kind} split {split}")
                same_on_every_rank(dp.model, comm)
                assert dp.model.step == ref.step == STEPS


def scenario_fit(comm, folder: Path) -> None:
    """dp.fit == model.fit with the same arguments, including a last batch of one row (one rank
    gets no rows), with validation metrics reduced, and a checkpoint written by rank 0."""
    r = comm.Get_rank()
    train, val = data(25, seed=1), data(11, seed=2)
    ref = bp.compile(mlp(), "float64", optimizer=OPTIMIZERS["adam"](), seed=3)
    dp = dist.DataParallel(bp.compile(mlp(), "float64", optimizer=OPTIMIZERS["adam"](), seed=3 + r))
    expected = ref.fit(train, epochs=3, batch_size=8, seed=5, validation=val, verbose=False)
    got = dp.fit(train, epochs=3, batch_size=8, seed=5, validation=val, verbose=False,
                 checkpoint=folder / "fit.npz")
    same_params(dp.model, ref, TOLERANCE["float64"], "fit")
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, err_msg=key)
    for key, value in ref.evaluate(val).items():
        np.testing.assert_allclose(dp.evaluate(val)[key], value, rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(dp.predict(val)["logits"], ref.predict(val)["logits"], rtol=1e-13)
    comm.Barrier()
    assert (folder / "fit.npz").is_file()


def scenario_gan(comm, folder: Path) -> None:
    """Named losses, alternating: each rank's half of the batch, the same as one process."""
    r = comm.Get_rank()

    def make():
        return bp.optim.Adam(lr=0.05, betas=(0.5, 0.999))

    ref = bp.compile(gan(), "float64", optimizer=make(), seed=4)
    dp = dist.DataParallel(bp.compile(gan(), "float64", optimizer=make(), seed=4))
    rng = np.random.default_rng(0)
    for _ in range(10):
        batch = {"z": rng.normal(size=(6, 3)), "real": rng.normal(1.0, 0.3, size=(6, 2))}
        mine = {k: v[3 * r:3 * r + 3] for k, v in batch.items()}
        for loss in ("d", "g"):
            np.testing.assert_allclose(dp.train_step(loss=loss, **mine), ref.train_step(loss=loss, **batch),
                                       rtol=1e-12)
    same_params(dp.model, ref, TOLERANCE["float64"], "gan")


def scenario_bn_dropout(comm, folder: Path) -> None:
    """Batch norm and dropout train; parameters stay equal on every rank, dropout differs per rank,
    running statistics are averaged."""
    dp = dist.DataParallel(bp.compile(bn_dropout(), "float64", optimizer=bp.optim.SGD(lr=0.1), seed=2))
    probe = data(8, seed=9)
    probe["y"] %= 3
    losses = comm.allgather(dp.model.loss(training=True, **probe))
    assert losses[0] != losses[1], f"dropout drew the same mask on both ranks: {losses}"
    rng = np.random.default_rng(comm.Get_rank())
    for _ in range(5):
        batch = data(6, seed=int(rng.integers(1 << 30)))
        batch["y"] %= 3
        dp.train_step(**batch)
    dp.sync_running_statistics()
    same_on_every_rank(dp.model, comm)


def scenario_bad_input(comm, folder: Path) -> None:
    """Rank 1 passes a batch of the wrong shape: every rank raises, naming rank 1 and the cause."""
    import time

    dp = dist.DataParallel(bp.compile(mlp(), "float64", optimizer=OPTIMIZERS["sgd"]()))
    batch = data(4)
    if comm.Get_rank() == 1:
        batch["x"] = batch["x"][:, :5]
    start = time.monotonic()
    try:
        dp.train_step(**batch)
    except dist.DistributedError as e:
        assert "rank 1" in str(e) and "InputError" in str(e), str(e)
        assert time.monotonic() - start < 10
        print(f"rank {comm.Get_rank()} raised: {e}", flush=True)
    else:
        raise AssertionError("no DistributedError")
    dp.train_step(**data(4))  # the job goes on after a caught failure
    same_on_every_rank(dp.model, comm)


def scenario_kill(comm, folder: Path) -> None:
    """Rank 1 dies by SIGKILL while rank 0 waits in the step's allreduce: the launcher ends the job."""
    dp = dist.DataParallel(bp.compile(mlp(), "float64", optimizer=OPTIMIZERS["sgd"]()))
    if comm.Get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dp.train_step(**data(4))


def scenario_uncaught(comm, folder: Path) -> None:
    """Rank 1 raises outside any collective call; rank 0 waits in one: the job aborts."""
    dp = dist.DataParallel(bp.compile(mlp(), "float64", optimizer=OPTIMIZERS["sgd"]()))
    if comm.Get_rank() == 1:
        raise RuntimeError("rank 1 gives up")
    dp.train_step(**data(4))


def main() -> None:
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    comm = dist.init()
    assert dist.world_size() == comm.Get_size() and dist.rank() == comm.Get_rank()
    globals()[f"scenario_{scenario}"](comm, folder)
    print(f"rank {comm.Get_rank()} ok {scenario}", flush=True)


if __name__ == "__main__":
    main()
