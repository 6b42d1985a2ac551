"""Hand-written NumPy backprop: every layer has a forward and a backward method.

    python bench/run_numpy.py --workload W2 --json

The GPT (W7) is one forward and one backward function over its blocks (layer norm,
causal attention by batched matmuls over the full T x T scores, erf GELU; the erf is
SciPy's when SciPy is installed, else math.erf element by element).
"""

from __future__ import annotations

import math

import common
import fn_optim
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from workloads import CNN, GPT, MLP, Workload, cnn_feature_shapes, gpt_layer_names, init_params, make_batch

_special = common.optional_import("scipy.special")
erf = _special.erf if _special is not None else np.vectorize(math.erf, otypes=[np.float32])

Arrays = dict[str, np.ndarray]


class Layer:
    """Caches what its backward pass needs; backward writes parameter gradients."""

    def forward(self, p: Arrays, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, p: Arrays, dy: np.ndarray, grads: Arrays) -> np.ndarray | None:
        raise NotImplementedError


class Dense(Layer):
    def __init__(self, w: str, b: str, first: bool) -> None:
        self.w, self.b, self.first = w, b, first

    def forward(self, p: Arrays, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ p[self.w] + p[self.b]

    def backward(self, p: Arrays, dy: np.ndarray, grads: Arrays) -> np.ndarray | None:
        grads[self.w] = self.x.T @ dy
        grads[self.b] = dy.sum(axis=0)
        return None if self.first else dy @ p[self.w].T


class ReLU(Layer):
    def forward(self, p: Arrays, x: np.ndarray) -> np.ndarray:
        self.mask = x > 0
        return x * self.mask

    def backward(self, p: Arrays, dy: np.ndarray, grads: Arrays) -> np.ndarray:
        return dy * self.mask


class Mish(Layer):
    """x * tanh(softplus(x)); d/dx = tanh(sp) + x * (1 - tanh(sp)^2) * sigmoid(x)."""

    def forward(self, p: Arrays, x: np.ndarray) -> np.ndarray:
        sp = np.logaddexp(np.float32(0), x)
        self.x, self.sp, self.t = x, sp, np.tanh(sp)
        return x * self.t

    def backward(self, p: Arrays, dy: np.ndarray, grads: Arrays) -> np.ndarray:
        sigmoid = np.exp(self.x - self.sp)
        return dy * (self.t + self.x * (1 - self.t * self.t) * sigmoid)


class Conv2d(Layer):
    """Stride-1 convolution by im2col + GEMM; col2im by summing the k*k shifted slices."""

    def __init__(self, w: str, b: str, kernel: int, padding: int, first: bool) -> None:
        self.w, self.b, self.k, self.pad, self.first = w, b, kernel, padding, first

    def forward(self, p: Arrays, x: np.ndarray) -> np.ndarray:
        n, pad = x.shape[0], self.pad
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        win = sliding_window_view(xp, (self.k, self.k), axis=(2, 3))  # n c ho wo k k
        self.ho, self.wo = win.shape[2], win.shape[3]
        self.cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * self.ho * self.wo, -1)
        self.x_shape = x.shape
        wmat = p[self.w].reshape(p[self.w].shape[0], -1)
        out = self.cols @ wmat.T + p[self.b]
        return out.reshape(n, self.ho, self.wo, -1).transpose(0, 3, 1, 2)

    def backward(self, p: Arrays, dy: np.ndarray, grads: Arrays) -> np.ndarray | None:
        w = p[self.w]
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, w.shape[0])
        grads[self.w] = (dy2.T @ self.cols).reshape(w.shape)
        grads[self.b] = dy2.sum(axis=0)
        if self.first:
            return None
        n, c, h, wd = self.x_shape
        dcols = (dy2 @ w.reshape(w.shape[0], -1)).reshape(n, self.ho, self.wo, c, self.k, self.k)
        dxp = np.zeros((n, c, h + 2 * self.pad, wd + 2 * self.pad), dy.dtype)
        for i in range(self.k):
            for j in range(self.k):
                dxp[:, :, i:i + self.ho, j:j + self.wo] += dcols[..., i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, self.pad:self.pad + h, self.pad:self.pad + wd]


class MaxPool2d(Layer):
    """Non-overlapping pooling; the gradient goes to the first maximum, as in PyTorch."""

    def __init__(self, size: int) -> None:
        self.s = size

    def _windows(self, x: np.ndarray) -> np.ndarray:
        n, c, h, w = x.shape
        s = self.s
        return (x.reshape(n, c, h // s, s, w // s, s).transpose(0, 1, 2, 4, 3, 5)
                .reshape(n, c, h // s, w // s, s * s))

    def forward(self, p: Arrays, x: np.ndarray) -> np.ndarray:
        self.x_shape = x.shape
        win = self._windows(x)
        self.idx = win.argmax(axis=-1)[..., None]
        return np.take_along_axis(win, self.idx, axis=-1)[..., 0]

    def backward(self, p: Arrays, dy: np.ndarray, grads: Arrays) -> np.ndarray:
        n, c, h, w = self.x_shape
        s = self.s
        dwin = np.zeros((n, c, h // s, w // s, s * s), dy.dtype)
        np.put_along_axis(dwin, self.idx, dy[..., None], axis=-1)
        return (dwin.reshape(n, c, h // s, w // s, s, s).transpose(0, 1, 2, 4, 3, 5)
                .reshape(n, c, h, w))


class Flatten(Layer):
    def forward(self, p: Arrays, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, p: Arrays, dy: np.ndarray, grads: Arrays) -> np.ndarray:
        return dy.reshape(self.shape)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))


class LSTMLastHidden(Layer):
    """One LSTM layer (gates i, f, g, o); outputs the last hidden state. First layer only."""

    def forward(self, p: Arrays, x: np.ndarray) -> np.ndarray:
        b, t_len, _ = x.shape
        hid = p["W_hh"].shape[1]
        self.x = x
        xw = x @ p["W_ih"].T + (p["b_ih"] + p["b_hh"])  # all time steps in one GEMM
        h = np.zeros((b, hid), x.dtype)
        c = np.zeros((b, hid), x.dtype)
        self.cache = []
        self.h_prev = np.empty((b, t_len, hid), x.dtype)
        for t in range(t_len):
            self.h_prev[:, t] = h
            z = xw[:, t] + h @ p["W_hh"].T
            i, f = _sigmoid(z[:, :hid]), _sigmoid(z[:, hid:2 * hid])
            g, o = np.tanh(z[:, 2 * hid:3 * hid]), _sigmoid(z[:, 3 * hid:])
            c_prev, c = c, f * c + i * g
            tc = np.tanh(c)
            h = o * tc
            self.cache.append((c_prev, i, f, g, o, tc))
        return h

    def backward(self, p: Arrays, dy: np.ndarray, grads: Arrays) -> None:
        b, t_len, _ = self.x.shape
        hid = p["W_hh"].shape[1]
        dz = np.empty((b, t_len, 4 * hid), dy.dtype)
        dh, dc = dy, np.zeros_like(dy)
        for t in reversed(range(t_len)):
            c_prev, i, f, g, o, tc = self.cache[t]
            dc = dc + dh * o * (1 - tc * tc)
            dz[:, t, :hid] = dc * g * i * (1 - i)
            dz[:, t, hid:2 * hid] = dc * c_prev * f * (1 - f)
            dz[:, t, 2 * hid:3 * hid] = dc * i * (1 - g * g)
            dz[:, t, 3 * hid:] = dh * tc * o * (1 - o)
            dh, dc = dz[:, t] @ p["W_hh"], dc * f
        dz2 = dz.reshape(b * t_len, -1)
        grads["W_ih"] = dz2.T @ self.x.reshape(b * t_len, -1)
        grads["W_hh"] = dz2.T @ self.h_prev.reshape(b * t_len, -1)
        grads["b_ih"] = grads["b_hh"] = dz2.sum(axis=0)


def build_layers(w: Workload) -> list[Layer]:
    m = w.model
    if isinstance(m, MLP):
        layers: list[Layer] = []
        n = len(m.sizes) - 1
        for i in range(n):
            layers.append(Dense(f"W{i}", f"b{i}", first=i == 0))
            if i < n - 1:
                layers.append(ReLU() if m.activation == "relu" else Mish())
        return layers
    if isinstance(m, CNN):
        layers = []
        for i in range(len(cnn_feature_shapes(m)) - 1):
            layers += [Conv2d(f"conv{i}_w", f"conv{i}_b", m.kernel, m.padding, first=i == 0),
                       ReLU(), MaxPool2d(m.pool)]
        return layers + [Flatten(), Dense("fc_w", "fc_b", first=False)]
    return [LSTMLastHidden(), Dense("fc_w", "fc_b", first=False)]


def mse(pred: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    diff = pred - y
    return float(np.mean(diff * diff)), diff * np.float32(2.0 / diff.size)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    d = e / total
    d[rows, labels] -= 1
    return loss, d * np.float32(1.0 / len(labels))


LOSSES = {"mse": mse, "softmax_ce": softmax_cross_entropy}


# --- the GPT (W7) -----------------------------------------------------------------------------

F32 = np.float32


def _ln_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> tuple[np.ndarray, tuple]:
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    rstd = 1 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + F32(eps))
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd)


def _ln_backward(dy: np.ndarray, w: np.ndarray, cache: tuple) -> tuple[np.ndarray, ...]:
    xhat, rstd = cache
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    rows = dy.reshape(-1, dy.shape[-1])
    return dx, (rows * xhat.reshape(rows.shape)).sum(axis=0), rows.sum(axis=0)


def _dense(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x.reshape(-1, x.shape[-1]) @ w
    return (y if b is None else y + b).reshape(*x.shape[:-1], w.shape[1])


def _dense_backward(x: np.ndarray, w: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, ...]:
    """(dx, dW, db) of y = x @ w + b."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return (dy2 @ w.T).reshape(x.shape), x2.T @ dy2, dy2.sum(axis=0)


class GPTTrainer:
    """x = wte[idx] + wpe; blocks of x += attn(ln1(x)), x += mlp(ln2(x)); ln_f; lm head; CE."""

    def __init__(self, w: Workload) -> None:
        assert isinstance(w.model, GPT)
        self.w, self.m = w, w.model
        self.params = init_params(w)
        self.state = fn_optim.init_state(w.optimizer, self.params, np.zeros_like)
        self.idx, labels = make_batch(w)
        self.labels = labels.reshape(-1)
        t = self.m.block
        self.future = np.triu(np.ones((t, t), bool), k=1)  # j > i: masked

    def _split_heads(self, z: np.ndarray) -> np.ndarray:  # (B, T, C) -> (B, H, T, d)
        bsz, t, _ = z.shape
        return z.reshape(bsz, t, self.m.heads, self.m.head_dim).transpose(0, 2, 1, 3)

    def _merge_heads(self, z: np.ndarray) -> np.ndarray:  # (B, H, T, d) -> (B, T, C)
        bsz, _, t, _ = z.shape
        return z.transpose(0, 2, 1, 3).reshape(bsz, t, self.m.embed)

    def _attn_forward(self, p: dict, n: dict, h: np.ndarray) -> tuple[np.ndarray, dict]:
        c = self.m.embed
        qkv = _dense(h, p[n["attn_w"]], p[n["attn_b"]])
        q, k, v = (self._split_heads(qkv[..., i * c:(i + 1) * c]) for i in range(3))
        scale = F32(1 / math.sqrt(self.m.head_dim))
        s = (q @ k.transpose(0, 1, 3, 2)) * scale
        s[..., self.future] = -np.inf
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        prob = e / e.sum(axis=-1, keepdims=True)
        y = self._merge_heads(prob @ v)
        out = _dense(y, p[n["proj_w"]], p[n["proj_b"]])
        return out, {"h": h, "q": q, "k": k, "v": v, "prob": prob, "y": y, "scale": scale}

    def _attn_backward(self, p: dict, n: dict, dout: np.ndarray, c: dict, grads: dict) -> np.ndarray:
        dy, grads[n["proj_w"]], grads[n["proj_b"]] = _dense_backward(c["y"], p[n["proj_w"]], dout)
        dy = self._split_heads(dy)
        prob = c["prob"]
        dprob = dy @ c["v"].transpose(0, 1, 3, 2)
        dv = prob.transpose(0, 1, 3, 2) @ dy
        ds = prob * (dprob - (dprob * prob).sum(axis=-1, keepdims=True)) * c["scale"]
        dq, dk = ds @ c["k"], ds.transpose(0, 1, 3, 2) @ c["q"]
        dqkv = np.concatenate([self._merge_heads(z) for z in (dq, dk, dv)], axis=-1)
        dh, grads[n["attn_w"]], grads[n["attn_b"]] = _dense_backward(c["h"], p[n["attn_w"]], dqkv)
        return dh

    def _mlp_forward(self, p: dict, n: dict, h: np.ndarray) -> tuple[np.ndarray, dict]:
        u = _dense(h, p[n["fc_w"]], p[n["fc_b"]])
        cdf = F32(0.5) * (1 + erf(u * F32(1 / math.sqrt(2)))).astype(F32)
        g = u * cdf
        return _dense(g, p[n["fc2_w"]], p[n["fc2_b"]]), {"h": h, "u": u, "cdf": cdf, "g": g}

    def _mlp_backward(self, p: dict, n: dict, dout: np.ndarray, c: dict, grads: dict) -> np.ndarray:
        dg, grads[n["fc2_w"]], grads[n["fc2_b"]] = _dense_backward(c["g"], p[n["fc2_w"]], dout)
        u = c["u"]
        pdf = np.exp(F32(-0.5) * u * u) * F32(1 / math.sqrt(2 * math.pi))
        du = dg * (c["cdf"] + u * pdf)
        dh, grads[n["fc_w"]], grads[n["fc_b"]] = _dense_backward(c["h"], p[n["fc_w"]], du)
        return dh

    def step(self) -> float:
        m, p, eps = self.m, self.params, self.m.eps
        x = p["wte"][self.idx] + p["wpe"]
        caches = []
        for layer in range(m.layers):
            n = gpt_layer_names(layer)
            h, ln1 = _ln_forward(x, p[n["ln1_w"]], p[n["ln1_b"]], eps)
            a, attn = self._attn_forward(p, n, h)
            x = x + a
            h, ln2 = _ln_forward(x, p[n["ln2_w"]], p[n["ln2_b"]], eps)
            f, mlp = self._mlp_forward(p, n, h)
            x = x + f
            caches.append((ln1, attn, ln2, mlp))
        hf, lnf = _ln_forward(x, p["lnf_w"], p["lnf_b"], eps)
        logits = _dense(hf, p["lm_w"], None).reshape(-1, m.vocab)
        loss, dlogits = softmax_cross_entropy(logits, self.labels)

        grads: Arrays = {}
        dhf, grads["lm_w"], _ = _dense_backward(hf, p["lm_w"], dlogits.reshape(*hf.shape[:-1], -1))
        dx, grads["lnf_w"], grads["lnf_b"] = _ln_backward(dhf, p["lnf_w"], lnf)
        for layer in reversed(range(m.layers)):
            n = gpt_layer_names(layer)
            ln1, attn, ln2, mlp = caches[layer]
            dh = self._mlp_backward(p, n, dx, mlp, grads)
            dh, grads[n["ln2_w"]], grads[n["ln2_b"]] = _ln_backward(dh, p[n["ln2_w"]], ln2)
            dx = dx + dh
            dh = self._attn_backward(p, n, dx, attn, grads)
            dh, grads[n["ln1_w"]], grads[n["ln1_b"]] = _ln_backward(dh, p[n["ln1_w"]], ln1)
            dx = dx + dh
        grads["wpe"] = dx.sum(axis=0)
        dwte = np.zeros_like(p["wte"])
        np.add.at(dwte, self.idx.reshape(-1), dx.reshape(-1, m.embed))
        grads["wte"] = dwte
        self.params, self.state = fn_optim.update(self.w.optimizer, p, grads, self.state, np.sqrt)
        return loss


class NumpyTrainer:
    def __init__(self, w: Workload) -> None:
        self.w = w
        self.layers = build_layers(w)
        self.loss_fn = LOSSES[w.loss]
        self.params = init_params(w)
        self.state = fn_optim.init_state(w.optimizer, self.params, np.zeros_like)
        self.x, self.y = make_batch(w)

    def step(self) -> float:
        h = self.x
        for layer in self.layers:
            h = layer.forward(self.params, h)
        loss, dh = self.loss_fn(h, self.y)
        grads: Arrays = {}
        for layer in reversed(self.layers):
            dh = layer.backward(self.params, dh, grads)
        self.params, self.state = fn_optim.update(
            self.w.optimizer, self.params, grads, self.state, np.sqrt)
        return loss


def build(w: Workload, variant: str) -> common.Trainer:
    if isinstance(w.model, GPT):
        return common.Trainer(GPTTrainer(w).step)
    return common.Trainer(NumpyTrainer(w).step)


def version() -> str:
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        return f"{np.__version__}, {blas['name']} {blas['version']}"
    except (AttributeError, KeyError, TypeError):
        return np.__version__


if __name__ == "__main__":
    common.run_cli("numpy", build, version=version)
