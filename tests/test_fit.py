"""fit as Keras users expect it (callbacks, EarlyStopping, Checkpoint, metrics, a shuffle stream
continued across calls, the History, verbose 0/1/2 and a throttled tqdm bar), and the call
papercuts: positional input arrays, optimizer=None, predict returning forward's dict."""

from __future__ import annotations

import inspect
import io
import re
import time

import numpy as np
import pytest

import bpcompile as bp
from bpcompile.train import distributed as dist

training = bp.training  # the module bpcompile.train.fit


def cls_graph(name: str = "fit_cls") -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 4))
    y = g.input("y", ("batch",), dtype="int32")
    W = g.param("W", (4, 3), init="glorot_uniform")
    b = g.param("b", (3,))
    logits = bp.tanh(x @ W + b) * 3.0
    g.output("logits", logits)
    g.loss(bp.softmax_cross_entropy(logits, y))
    return g


def reg_graph(name: str = "fit_reg") -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 3))
    t = g.input("t", ("batch", 1))
    W = g.param("W", (3, 1), init="normal")
    out = x @ W
    g.output("out", out)
    g.output("double", 2.0 * out)
    g.loss(bp.mse(out, t))
    return g


def cls_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    centers = rng.normal(size=(3, 4)) * 0 + np.eye(3, 4) * 2
    return {"x": centers[y] + 0.7 * rng.normal(size=(n, 4)), "y": y}


def reg_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    return {"x": x, "t": x @ np.array([[1.0], [-2.0], [0.5]]) + 0.1 * rng.normal(size=(n, 1))}


def compiled(make=cls_graph, seed: int = 0, optimizer=None, **kw) -> bp.CompiledModel:
    """A fresh model (the build is cached: only the first compile of a graph builds)."""
    return bp.compile(make(**kw), dtype="float64", optimizer=optimizer or bp.optim.SGD(lr=0.05), seed=seed)


def accuracy(outputs: dict, inputs: dict) -> float:
    return float(np.mean(np.argmax(outputs["logits"], axis=-1) == inputs["y"]))


def same_params(a: bp.CompiledModel, b: bp.CompiledModel) -> bool:
    return all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


class Recorder(bp.callbacks.Callback):
    """Records every hook call, and the parameters at each epoch's end."""

    def __init__(self, stop_at_epoch: int | None = None, stop_at_batch: int | None = None):
        self.calls: list[tuple] = []
        self.params: list[dict[str, np.ndarray]] = []
        self.stop_at_epoch, self.stop_at_batch = stop_at_epoch, stop_at_batch

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", dict(logs)))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, dict(logs)))
        return batch == self.stop_at_batch

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, dict(logs)))
        self.params.append({k: v.copy() for k, v in self.model.params.items()})
        return epoch == self.stop_at_epoch

    def on_train_end(self, logs=None):
        self.calls.append(("train_end", dict(logs)))


class Scripted:
    """A metric returning the given values one call after another (to script a monitored value)."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def __call__(self, outputs, inputs):
        self.calls += 1
        return self.values[self.calls - 1]


@pytest.fixture(scope="module", autouse=True)
def _builds(build_dir):
    """Build each graph once for the module."""
    compiled(cls_graph)
    compiled(reg_graph)


# --- callbacks ------------------------------------------------------------------------------------

def test_callback_hooks_in_order_and_stopping_at_an_epoch():
    model = compiled()
    data = cls_data(40, 0)
    rec = Recorder(stop_at_epoch=2)
    history = model.fit(data, epochs=10, batch_size=16, verbose=0, callbacks=[rec])
    assert len(history["loss"]) == 3 and model.step == 3 * 3  # epochs 0, 1, 2 of 3 batches each
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["train_begin"] + (["epoch_begin"] + ["batch_end"] * 3 + ["epoch_end"]) * 3 + ["train_end"]
    assert rec.model is model
    assert [c[1] for c in rec.calls if c[0] == "epoch_end"] == [0, 1, 2]  # Keras counts epochs from 0
    batch_logs = [c[2] for c in rec.calls if c[0] == "batch_end"][:3]
    assert [log["size"] for log in batch_logs] == [16, 16, 8]
    assert sum(log["loss"] * log["size"] for log in batch_logs) / 40 == pytest.approx(history["loss"][0], rel=1e-12)
    last = rec.calls[-2][2]
    assert last["loss"] == history["loss"][-1] and set(last) == {"loss", "seconds", "samples_per_second"}
    assert rec.calls[-1] == ("train_end", last)


def test_a_function_is_an_epoch_end_callback_and_every_callback_sees_the_last_epoch():
    model = compiled()
    seen, rec = [], Recorder()
    model.fit(cls_data(20, 1), epochs=5, batch_size=10, verbose=0,
              callbacks=[lambda epoch, logs: seen.append(epoch) or epoch == 1, rec])
    assert seen == [0, 1]
    assert [c[1] for c in rec.calls if c[0] == "epoch_end"] == [0, 1]  # called although the first stopped


def test_on_batch_end_stops_after_the_batch_and_the_epoch_is_logged():
    model = compiled()
    rec = Recorder(stop_at_batch=1)
    history = model.fit(cls_data(64, 2), epochs=3, batch_size=8, verbose=0, callbacks=rec)
    assert model.step == 2 and len(history["loss"]) == 1
    batch_losses = [c[2]["loss"] for c in rec.calls if c[0] == "batch_end"]
    assert history["loss"][0] == pytest.approx(np.mean(batch_losses), rel=1e-12)  # over the rows trained
    assert [c[0] for c in rec.calls][-2:] == ["epoch_end", "train_end"]


def test_a_callback_without_hooks_is_refused():
    with pytest.raises(TypeError, match="a callback needs one of the methods on_train_begin"):
        compiled().fit(cls_data(8, 0), verbose=0, callbacks=[object()])


# --- EarlyStopping --------------------------------------------------------------------------------

def test_early_stopping_stops_after_patience_and_restores_the_best_epoch():
    model = compiled()
    score = Scripted([3.0, 2.0, 2.5, 2.4, 2.2, 1.0])
    stop = bp.callbacks.EarlyStopping(monitor="val_score", patience=2)
    rec = Recorder()
    history = model.fit(cls_data(30, 0), epochs=20, batch_size=8, validation=cls_data(10, 1), verbose=0,
                        metrics={"score": score}, callbacks=[rec, stop])
    assert history["val_score"] == [3.0, 2.0, 2.5, 2.4]  # two epochs without improvement on 2.0
    assert (stop.best, stop.best_epoch, stop.stopped_epoch) == (2.0, 1, 3)
    assert model.step == 4 * 4
    for k, v in model.params.items():  # the weights at the end of epoch 1, not of epoch 3
        np.testing.assert_array_equal(v, rec.params[1][k])
    assert not np.array_equal(rec.params[1]["W"], rec.params[3]["W"])


def test_early_stopping_patience_zero_min_delta_and_max_mode():
    model = compiled()
    stop = bp.callbacks.EarlyStopping(monitor="val_acc", min_delta=0.05, restore_best=False)
    assert stop.mode == "max" and stop.patience == 0  # auto: accuracy-like names grow
    rec = Recorder()
    model.fit(cls_data(16, 0), epochs=9, batch_size=8, validation=cls_data(8, 1), verbose=0,
              metrics={"acc": Scripted([0.5, 0.6, 0.62, 0.9])}, callbacks=[stop, rec])
    assert (stop.best, stop.best_epoch, stop.stopped_epoch) == (0.6, 1, 2)  # 0.62 is not 0.05 better
    for k, v in model.params.items():  # restore_best=False: the last epoch's weights stay
        np.testing.assert_array_equal(v, rec.params[-1][k])


def test_early_stopping_on_the_training_loss_restarts_with_each_fit():
    model = compiled()
    stop = bp.callbacks.EarlyStopping(monitor="loss", patience=1)
    assert stop.mode == "min"
    model.fit(cls_data(24, 0), epochs=3, batch_size=8, verbose=0, callbacks=[stop])
    assert stop.stopped_epoch is None and stop.best_epoch == 2  # the loss went down every epoch
    first_best = stop.best
    model.fit(cls_data(24, 0), epochs=1, batch_size=8, verbose=0, callbacks=[stop])
    assert stop.best_epoch == 0 and stop.best < first_best


def test_a_monitored_value_fit_does_not_log_is_refused_before_training():
    model = compiled()
    with pytest.raises(ValueError, match=r"EarlyStopping monitors 'val_loss'.*pass validation="):
        model.fit(cls_data(8, 0), verbose=0, callbacks=[bp.callbacks.EarlyStopping()])
    with pytest.raises(ValueError, match=r"Checkpoint monitors 'val_f1'"):
        model.fit(cls_data(8, 0), validation=cls_data(8, 1), verbose=0,
                  callbacks=[bp.callbacks.Checkpoint("x.npz", best=True, monitor="val_f1")])
    assert model.step == 0
    with pytest.raises(ValueError, match="patience must be an int >= 0"):
        bp.callbacks.EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="mode must be 'auto', 'min' or 'max'"):
        bp.callbacks.EarlyStopping(mode="lowest")


# --- Checkpoint -----------------------------------------------------------------------------------

def test_checkpoint_every_writes_the_epochs_named_in_the_path(tmp_path):
    model = compiled()
    rec = Recorder()
    ck = bp.callbacks.Checkpoint(tmp_path / "run" / "ck-{epoch:02d}-{loss:.3f}.npz", every=2)
    history = model.fit(cls_data(20, 0), epochs=5, batch_size=8, verbose=0, callbacks=[rec, ck])
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == [f"ck-02-{history['loss'][1]:.3f}.npz", f"ck-04-{history['loss'][3]:.3f}.npz"]
    assert ck.saved == [tmp_path / "run" / n for n in names]
    for path, epoch in zip(ck.saved, (1, 3)):  # the model as it was at the end of that epoch
        twin = compiled(seed=9)
        twin.load(path)
        assert twin.step == 3 * (epoch + 1)
        for k, v in twin.params.items():
            np.testing.assert_array_equal(v, rec.params[epoch][k])


def test_checkpoint_best_saves_only_improvements_across_fits(tmp_path):
    model = compiled()
    rec = Recorder()
    ck = bp.callbacks.Checkpoint(tmp_path / "best.npz", best=True, monitor="val_score")
    score = Scripted([5.0, 3.0, 4.0, 2.0, 2.5, 9.0, 1.5])
    fit = lambda epochs: model.fit(cls_data(16, 0), epochs=epochs, batch_size=8, validation=cls_data(8, 1),  # noqa: E731
                                   verbose=0, metrics={"score": score}, callbacks=[rec, ck])
    fit(5)
    assert len(ck.saved) == 3 and ck.best == 2.0  # epochs 0, 1 and 3
    fit(1)  # 9.0: not better than the best saved in the first fit
    assert len(ck.saved) == 3
    twin = compiled(seed=9)
    twin.load(tmp_path / "best.npz")
    for k, v in twin.params.items():
        np.testing.assert_array_equal(v, rec.params[3][k])
    fit(1)  # 1.5
    assert len(ck.saved) == 4 and [p.name for p in tmp_path.iterdir()] == ["best.npz"]


def test_a_checkpoint_interrupted_while_saving_leaves_the_last_one_whole(tmp_path, monkeypatch):
    model = compiled()
    path = tmp_path / "ck.npz"
    model.fit(cls_data(16, 0), epochs=1, batch_size=8, verbose=0, checkpoint=path)
    good = path.read_bytes()

    def crash_midway(file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")  # some bytes reach the file, then the process is interrupted
        raise KeyboardInterrupt("interrupted while saving")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        model.fit(cls_data(16, 0), epochs=1, batch_size=8, verbose=0, callbacks=[bp.callbacks.Checkpoint(path)])
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["ck.npz"]


# --- metrics --------------------------------------------------------------------------------------

def test_validation_metrics_are_computed_once_on_the_whole_set():
    model = compiled()
    val = cls_data(50, 1)
    rows = []
    history = model.fit(cls_data(60, 0), epochs=2, batch_size=16, validation=val, verbose=0,
                        metrics={"acc": accuracy, "rows": lambda o, i: rows.append(len(i["y"])) or len(o["logits"])})
    assert rows == [50, 50]  # one call per epoch, on every validation row (evaluate batches by 256)
    assert history["val_rows"] == [50.0, 50.0]
    assert history["val_acc"][-1] == accuracy(model.forward(x=val["x"]), val)
    assert history["val_acc"] == history["val_accuracy"]  # the classifier's own accuracy agrees
    assert model.evaluate(val, batch_size=7, metrics={"acc": accuracy})["acc"] == history["val_acc"][-1]


def test_train_metrics_are_row_weighted_means_of_the_batches():
    model = compiled()
    data = cls_data(45, 0)
    history = model.fit(data, epochs=2, batch_size=16, verbose=0, train_metrics=True,
                        metrics={"x0": lambda o, i: float(np.mean(i["x"][:, 0])), "acc": accuracy})
    np.testing.assert_allclose(history["x0"], [np.mean(data["x"][:, 0])] * 2, rtol=1e-12)  # any order
    assert all(0 <= a <= 1 for a in history["acc"])
    assert list(history) == ["loss", "x0", "acc", "seconds", "samples_per_second"]


def test_metric_errors():
    model = compiled()
    data = cls_data(8, 0)
    with pytest.raises(ValueError, match="metrics are computed on the validation data"):
        model.fit(data, verbose=0, metrics={"acc": accuracy})
    for name in ("loss", "val_acc", "seconds", ""):
        with pytest.raises(ValueError, match="metric name"):
            model.fit(data, validation=data, verbose=0, metrics={name: accuracy})
    with pytest.raises(TypeError, match="metric 'acc' must be a function"):
        model.fit(data, validation=data, verbose=0, metrics={"acc": 1.0})
    with pytest.raises(TypeError, match="metric 'acc' returned str, not a number"):
        model.evaluate(data, metrics={"acc": lambda o, i: "high"})
    assert model.step == 0


# --- the shuffle stream ---------------------------------------------------------------------------

def test_successive_fits_continue_the_shuffle_stream():
    data = reg_data(50, 0)
    once = compiled(reg_graph)
    once.fit(data, epochs=3, batch_size=8, verbose=0)
    stepwise = compiled(reg_graph)
    for _ in range(3):
        stepwise.fit(data, epochs=1, batch_size=8, verbose=0)
    assert same_params(once, stepwise)
    assert isinstance(stepwise.shuffle_rng, np.random.Generator)
    replayed = compiled(reg_graph)  # what fit did before: the same order every call
    for _ in range(3):
        replayed.fit(data, epochs=1, batch_size=8, seed=0, verbose=0)
    assert not same_params(once, replayed)


def test_a_seed_restarts_the_stream_and_the_first_fit_starts_from_the_model_seed():
    data = reg_data(50, 0)
    a, b = compiled(reg_graph), compiled(reg_graph)
    a.fit(data, epochs=2, batch_size=8, seed=5, verbose=0)
    b.fit(data, epochs=1, batch_size=8, seed=5, verbose=0)
    b.fit(data, epochs=1, batch_size=8, verbose=0)
    assert same_params(a, b)
    c, d = compiled(reg_graph, seed=3), compiled(reg_graph, seed=3)
    c.fit(data, epochs=2, batch_size=8, verbose=0)
    d.fit(data, epochs=2, batch_size=8, seed=3, verbose=0)
    assert same_params(c, d)
    with pytest.raises(ValueError, match="seed must be an int or None"):
        a.fit(data, seed=1.5, verbose=0)


# --- the History ----------------------------------------------------------------------------------

def test_history_is_a_dict_of_lists_in_keras_order():
    model = compiled()
    history = model.fit(cls_data(30, 0), epochs=3, batch_size=8, validation=cls_data(10, 1), verbose=0,
                        metrics={"acc": accuracy}, train_metrics=True)
    assert type(history) is dict
    assert list(history) == ["loss", "acc", "val_loss", "val_accuracy", "val_acc", "seconds", "samples_per_second"]
    assert all(type(v) is list and len(v) == 3 for v in history.values())
    assert list(compiled(reg_graph).fit(reg_data(9, 0), verbose=0)) == ["loss", "seconds", "samples_per_second"]


def nll_graph(name: str = "fit_nll", output: bool = True) -> bp.Graph:
    g = bp.Graph(name)
    x = g.input("x", ("batch", 4))
    y = g.input("y", ("batch",), dtype="int32")
    W = g.param("W", (4, 3), init="glorot_uniform")
    log_probs = bp.log_softmax(x @ W)
    g.output("log_probs" if output else "scores", log_probs if output else x @ W)
    g.loss(bp.nll_loss(log_probs, y))
    return g


def test_an_nll_loss_classifier_logs_val_accuracy_as_cross_entropy_does():
    model = compiled(nll_graph)
    val = cls_data(20, 1)
    history = model.fit(cls_data(40, 0), epochs=2, batch_size=8, validation=val, verbose=0)
    assert list(history) == ["loss", "val_loss", "val_accuracy", "seconds", "samples_per_second"]
    predicted = np.argmax(model.predict(val)["log_probs"], axis=-1)
    assert history["val_accuracy"][-1] == np.mean(predicted == val["y"]) > 0.5
    assert model.evaluate(val)["accuracy"] == history["val_accuracy"][-1]
    # the log-probabilities are no output: there is nothing to take the argmax of
    assert "val_accuracy" not in compiled(nll_graph, name="fit_nll_hidden", output=False).fit(
        cls_data(8, 0), validation=val, verbose=0)


def test_initial_epoch_counts_on_as_keras():
    model = compiled()
    rec, out = Recorder(), io.StringIO()
    history = model.fit(cls_data(16, 0), epochs=5, initial_epoch=3, batch_size=8, verbose=2, stream=out,
                        callbacks=[rec])
    assert len(history["loss"]) == 2 and model.step == 4
    assert [c[1] for c in rec.calls if c[0] == "epoch_end"] == [3, 4]
    assert [line.split(" - ")[0] for line in out.getvalue().splitlines()] == ["epoch 4/5", "epoch 5/5"]
    assert model.fit(cls_data(16, 0), epochs=2, initial_epoch=2, verbose=0)["loss"] == []


# --- progress -------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


LINE = re.compile(r"^epoch (\d+)/3 - loss \d\.\d{4} - val_loss \d\.\d{4} - val_accuracy \d\.\d{4} - "
                  r"\d+\.\d\d s - [\d,]+ samples/s$")


@pytest.mark.parametrize("verbose", [0, False, 1, True, 2])
def test_verbose_off_a_terminal_prints_one_line_per_epoch_or_nothing(verbose):
    out = io.StringIO()
    compiled().fit(cls_data(40, 0), epochs=3, batch_size=8, validation=cls_data(8, 1), verbose=verbose, stream=out)
    text = out.getvalue()
    if not verbose:
        assert text == ""
        return
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 3
    assert [LINE.match(line).group(1) for line in lines] == ["1", "2", "3"], lines


def test_verbose_2_on_a_terminal_is_one_line_per_epoch_and_stderr_is_the_default(capsys):
    out = Terminal()
    compiled().fit(cls_data(40, 0), epochs=3, batch_size=8, validation=cls_data(8, 1), verbose=2, stream=out)
    assert "\r" not in out.getvalue() and len(out.getvalue().splitlines()) == 3
    compiled().fit(cls_data(40, 0), epochs=2, batch_size=8, verbose=2)
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 2


def test_verbose_1_on_a_terminal_draws_a_tqdm_bar_with_eta_and_rate():
    pytest.importorskip("tqdm", reason="needs the [progress] extra")
    out = Terminal()
    compiled().fit(cls_data(40, 0), epochs=2, batch_size=8, validation=cls_data(8, 1), verbose=1, stream=out)
    finals = [part for part in out.getvalue().split("\r") if part.endswith("\n")]
    assert len(finals) == 2
    for i, line in enumerate(finals, 1):
        assert line.startswith(f"epoch {i}/2: 100%") and "40/40" in line
        assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+[kM]? samples/s, loss \d\.\d{4} - val_loss \d\.\d{4}", line)


def test_the_tqdm_bar_is_throttled(monkeypatch):
    tqdm = pytest.importorskip("tqdm", reason="needs the [progress] extra").tqdm
    made = []

    class Counting(tqdm):
        def __init__(self, *args, **kwargs):
            self.draws, self.updates = 0, 0
            made.append((self, kwargs))
            super().__init__(*args, **kwargs)

        def display(self, *args, **kwargs):
            self.draws += 1
            return super().display(*args, **kwargs)

        def update(self, n=1):
            self.updates += 1
            return super().update(n)

    monkeypatch.setattr(training, "_tqdm", lambda: Counting)
    slow = bp.callbacks.Callback()
    slow.on_batch_end = lambda batch, logs: time.sleep(0.004)
    out = Terminal()
    start = time.perf_counter()
    compiled().fit(cls_data(200, 0), epochs=1, batch_size=1, verbose=1, stream=out, callbacks=[slow])
    seconds = time.perf_counter() - start
    (bar, kwargs), = made
    assert kwargs["file"] is out and bar.n == 200 and training.MININTERVAL >= 0.1
    budget = seconds / training.MININTERVAL + 3  # first draw, the throttled ones, the last
    assert 3 <= bar.draws <= budget and bar.updates <= budget, (bar.draws, bar.updates, seconds)
    assert bar.draws < 30  # 200 steps of at least 4 ms


def test_without_tqdm_a_throttled_bar_is_drawn_with_eta(monkeypatch):
    monkeypatch.setattr(training, "_tqdm", lambda: None)
    out = Terminal()
    compiled().fit(cls_data(40, 0), epochs=2, batch_size=8, verbose=1, stream=out)
    assert out.getvalue().count("\r") == 2  # a fast epoch: only its last line
    assert re.match(r"\repoch 1/2 \[#{20}\] 40/40 - loss \d\.\d{4} - \d+\.\d\d s - [\d,]+ samples/s", out.getvalue())
    monkeypatch.setattr(training, "MININTERVAL", 0.0)
    out = Terminal()
    compiled().fit(cls_data(40, 0), epochs=1, batch_size=8, verbose=1, stream=out)
    parts = out.getvalue().split("\r")[1:]
    assert len(parts) == 5 + 1 and all(re.search(r"ETA \d\d:\d\d - [\d,]+ samples/s", p) for p in parts[:-1])


def test_bad_verbose_is_refused():
    for bad in (3, -1, "yes", 1.0):
        with pytest.raises(ValueError, match=r"verbose must be 0 \(silent\), 1 \(progress bar\) or 2"):
            compiled().fit(cls_data(8, 0), verbose=bad)


# --- model.fit and training.fit ---------------------------------------------------------------------

def test_model_fit_takes_every_option_of_training_fit():
    def options(fn, skip):
        return {name: p.default for name, p in inspect.signature(fn).parameters.items() if name not in skip}

    assert options(bp.CompiledModel.fit, {"self"}) == options(training.fit, {"model"})


def test_model_fit_with_a_data_parallel_of_one_rank_equals_plain_fit():
    data, val = cls_data(30, 0), cls_data(10, 1)
    kwargs = dict(epochs=4, batch_size=8, validation=val, metrics={"acc": accuracy}, verbose=0)
    plain = compiled()
    expected = plain.fit(data, callbacks=[bp.callbacks.EarlyStopping(patience=5)], **kwargs)
    model = compiled()
    got = model.fit(data, parallel=dist.DataParallel(model, comm=dist._SingleProcess()),
                    callbacks=[bp.callbacks.EarlyStopping(patience=5)], **kwargs)
    assert same_params(plain, model)
    for key in ("loss", "val_loss", "val_accuracy", "val_acc"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, err_msg=key)


# --- call papercuts -------------------------------------------------------------------------------

def test_positional_arrays_in_the_declared_input_order():
    a, b = compiled(), compiled()
    data = cls_data(6, 0)
    X, Y = data["x"], data["y"]
    assert a.loss(X, Y) == b.loss(x=X, y=Y)
    assert a.loss(X, Y, training=False) == b.loss(x=X, y=Y, training=False)
    value, grads = a.loss_and_grad(X, Y)
    want, want_grads = b.loss_and_grad(x=X, y=Y)
    assert value == want and all(np.array_equal(grads[k], want_grads[k]) for k in grads)
    assert a.train_step(X, Y) == b.train_step(x=X, y=Y)
    assert a.train_step(X, y=Y, lr=0.5) == b.train_step(x=X, y=Y, lr=0.5)
    assert a.train_step({"x": X, "y": Y}) == b.train_step(**data)  # one dict
    assert same_params(a, b)
    forward = b.forward(x=X)["logits"]
    for out in (a.forward(X), a.forward(X, Y), a.forward({"x": X}), a.predict(X), a.predict(X, batch_size=4)):
        np.testing.assert_array_equal(out["logits"], forward)


def test_positional_arrays_follow_the_declaration_not_the_alphabet(build_dir):
    g = bp.Graph("fit_order")
    t = g.input("t", ("batch", 2))  # declared first
    a = g.input("a", ("batch", 2))
    g.output("d", a - t)
    g.loss(bp.mse(a, t))
    model = bp.compile(g, dtype="float64", optimizer=bp.optim.SGD(lr=0.1))
    T, A = np.zeros((3, 2)), np.ones((3, 2))
    np.testing.assert_array_equal(model.forward(T, A)["d"], A - T)
    assert model.loss(T, 2 * A) == 4.0


def test_ambiguous_positional_arrays_ask_for_keywords():
    model = compiled()
    X, Y = cls_data(4, 0)["x"], cls_data(4, 0)["y"]
    with pytest.raises(TypeError, match=r"train_step\(\) takes at most 2 input arrays by position \(x, y\), got 3; "
                                        r"pass the inputs by name \(x=\.\.\., y=\.\.\.\)"):
        model.train_step(X, Y, Y)
    with pytest.raises(TypeError, match=r"forward\(\) takes at most 2 input arrays"):
        model.forward(X, Y, X)
    with pytest.raises(TypeError, match="input 'x' both by position and by name"):
        model.loss(X, x=X, y=Y)
    with pytest.raises(TypeError, match="a dataset dict or input arrays, not both"):
        model.predict({"x": X}, X)
    assert model.step == 0


def test_optimizer_none_compiles_no_training_entries(tmp_path):
    model = bp.compile(cls_graph("fit_no_opt"), dtype="float64", optimizer=None, seed=0)
    assert model.optimizer is None and model.meta["optimizer"] is None
    assert not [e for e in model.meta["entries"] if e.startswith(("train", "update", "backward"))]
    data = cls_data(6, 0)
    model.forward(x=data["x"])
    model.loss_and_grad(**data)
    for call in (lambda: model.train_step(**data), lambda: model.train_step(data["x"], data["y"]),
                 lambda: model.backward(**data), lambda: model.fit(data, verbose=0)):
        with pytest.raises(bp.InputError, match=r"'fit_no_opt' was compiled without an optimizer \(optimizer=None\)"):
            call()
    assert model.step == 0
    reloaded = bp.load(model.build_path)
    assert reloaded.optimizer is None
    with pytest.raises(bp.InputError, match="compiled without an optimizer"):
        reloaded.train_step(**data)


def test_an_omitted_optimizer_is_still_sgd():
    model = bp.compile(cls_graph(), dtype="float64")
    assert model.optimizer.kind == "sgd" and model.optimizer.lr_at(1) == 0.01
    g = bp.Graph("fit_outputs_only")
    g.output("y", g.input("x", ("batch", 2)) * 2.0)
    assert bp.compile(g).optimizer is None


def test_predict_returns_what_forward_returns():
    model = compiled(reg_graph)
    X = reg_data(25, 0)["x"]
    full = model.forward(x=X)
    for got in (model.predict({"x": X}), model.predict(x=X, batch_size=7), model.predict(X, batch_size=25)):
        assert type(got) is dict and list(got) == list(full) == ["out", "double"]
        for k in full:
            np.testing.assert_allclose(got[k], full[k], rtol=1e-14)
    one = compiled().predict(x=cls_data(5, 0)["x"])
    assert list(one) == ["logits"] and one["logits"].shape == (5, 3)
