"""PyTorch, idiomatic: nn modules, F losses, torch.optim. Two variants:

    python bench/run_torch.py --workload W2 --json                    # eager
    python bench/run_torch.py --workload W2 --variant compile --json  # torch.compile

The compile variant compiles the model (forward and, through AOTAutograd, backward) and
the optimizer step, as PyTorch's compiled-optimizer tutorial does; backward() itself is
called eagerly in between, as in any training loop. For the GPT (W7) it compiles the whole
train step instead (zero_grad, forward, loss, backward, Adam step) as one function.

The GPT uses PyTorch's fused kernels: F.scaled_dot_product_attention(is_causal=True),
F.layer_norm, F.gelu (erf form), F.cross_entropy.
"""

from __future__ import annotations

from typing import Any

import common
import numpy as np
from workloads import CNN, GPT, MLP, Workload, cnn_feature_shapes, gpt_layer_names, init_params, make_batch

torch = common.optional_import("torch")
VARIANTS = ("eager", "compile")


# Modules subclass torch.nn.Module when torch is importable (else the runner only skips).
_Module: Any = torch.nn.Module if torch is not None else object


class Mish(_Module):
    """x * tanh(softplus(x)), from primitives (not F.mish)."""

    def forward(self, x: Any) -> Any:
        return x * torch.tanh(torch.nn.functional.softplus(x))


class LSTMLastHidden(_Module):
    def __init__(self, p: dict[str, np.ndarray]) -> None:
        super().__init__()
        hidden, inp = p["W_hh"].shape[1], p["W_ih"].shape[1]
        self.lstm = torch.nn.LSTM(inp, hidden, batch_first=True)
        self.fc = _linear(p["fc_w"], p["fc_b"])
        with torch.no_grad():
            for ours, theirs in (("W_ih", "weight_ih_l0"), ("W_hh", "weight_hh_l0"),
                                 ("b_ih", "bias_ih_l0"), ("b_hh", "bias_hh_l0")):
                getattr(self.lstm, theirs).copy_(torch.from_numpy(p[ours]))

    def forward(self, x: Any) -> Any:
        _, (h, _) = self.lstm(x)
        return self.fc(h[-1])


class GPTModel(_Module):
    """The W7 GPT on the shared weights, with the same parameter names (see workloads.GPT)."""

    def __init__(self, m: GPT, p: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.m = m
        self.p = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p.items()})

    def _ln(self, x: Any, w: str, b: str) -> Any:
        return torch.nn.functional.layer_norm(x, (self.m.embed,), self.p[w], self.p[b], self.m.eps)

    def forward(self, idx: Any) -> Any:
        F, m, p = torch.nn.functional, self.m, self.p
        bsz, t = idx.shape
        c, h, d = m.embed, m.heads, m.head_dim
        x = F.embedding(idx, p["wte"]) + p["wpe"]
        for layer in range(m.layers):
            n = gpt_layer_names(layer)
            qkv = self._ln(x, n["ln1_w"], n["ln1_b"]) @ p[n["attn_w"]] + p[n["attn_b"]]
            q, k, v = (z.view(bsz, t, h, d).transpose(1, 2) for z in qkv.split(c, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(bsz, t, c)
            x = x + (y @ p[n["proj_w"]] + p[n["proj_b"]])
            u = self._ln(x, n["ln2_w"], n["ln2_b"]) @ p[n["fc_w"]] + p[n["fc_b"]]
            x = x + (F.gelu(u) @ p[n["fc2_w"]] + p[n["fc2_b"]])
        return self._ln(x, "lnf_w", "lnf_b") @ p["lm_w"]  # (B, T, vocab)


def build_gpt(w: Workload, variant: str) -> common.Trainer:
    assert isinstance(w.model, GPT)
    torch.manual_seed(0)
    model = GPTModel(w.model, init_params(w))
    opt = build_optimizer(w, model.parameters())
    idx_np, labels_np = make_batch(w)
    idx = torch.from_numpy(idx_np.astype(np.int64))
    labels = torch.from_numpy(labels_np.astype(np.int64)).reshape(-1)
    vocab = w.model.vocab

    def train_step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(idx).reshape(-1, vocab), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    step = torch.compile(train_step) if variant == "compile" else train_step
    return common.Trainer(step, lambda loss: float(loss.item()))


def _load(module: Any, weight: np.ndarray, bias: np.ndarray) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        module.bias.copy_(torch.from_numpy(bias))


def _linear(w: np.ndarray, b: np.ndarray) -> Any:
    lin = torch.nn.Linear(w.shape[0], w.shape[1])
    _load(lin, w.T, b)  # nn.Linear stores (out, in)
    return lin


def _mlp(m: MLP, p: dict[str, np.ndarray]) -> Any:
    layers: list[Any] = []
    for i in range(len(m.sizes) - 1):
        layers.append(_linear(p[f"W{i}"], p[f"b{i}"]))
        layers.append(torch.nn.ReLU() if m.activation == "relu" else Mish())
    return torch.nn.Sequential(*layers[:-1])


def _cnn(m: CNN, p: dict[str, np.ndarray]) -> Any:
    nn = torch.nn
    layers: list[Any] = []
    for i in range(len(cnn_feature_shapes(m)) - 1):
        w = p[f"conv{i}_w"]
        conv = nn.Conv2d(w.shape[1], w.shape[0], m.kernel, padding=m.padding)
        _load(conv, w, p[f"conv{i}_b"])
        layers += [conv, nn.ReLU(), nn.MaxPool2d(m.pool)]
    return nn.Sequential(*layers, nn.Flatten(), _linear(p["fc_w"], p["fc_b"]))


def build_model(w: Workload) -> Any:
    p = init_params(w)
    if isinstance(w.model, MLP):
        return _mlp(w.model, p)
    if isinstance(w.model, CNN):
        return _cnn(w.model, p)
    return LSTMLastHidden(p)


def build_optimizer(w: Workload, params: Any) -> Any:
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[w.optimizer.name]
    return cls(params, lr=w.optimizer.lr)


def build(w: Workload, variant: str) -> common.Trainer:
    if isinstance(w.model, GPT):
        return build_gpt(w, variant)
    torch.manual_seed(0)
    model = build_model(w)
    opt = build_optimizer(w, model.parameters())
    x_np, y_np = make_batch(w)
    x = torch.from_numpy(x_np)
    y = torch.from_numpy(y_np.astype(np.int64) if w.loss == "softmax_ce" else y_np)
    loss_fn = (torch.nn.functional.cross_entropy if w.loss == "softmax_ce"
               else torch.nn.functional.mse_loss)
    forward, opt_step = model, opt.step
    if variant == "compile":
        forward, opt_step = torch.compile(model), torch.compile(opt.step)

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x), y)
        loss.backward()
        opt_step()
        return loss.detach()

    return common.Trainer(step, lambda loss: float(loss.item()))


def version() -> str:
    libs = [name for name, on in (("MKL", torch.backends.mkl.is_available()),
                                  ("oneDNN", torch.backends.mkldnn.is_available())) if on]
    return f"{torch.__version__}, {' + '.join(libs) or 'no MKL'}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    common.run_cli("torch", build, variants=VARIANTS, requires=("torch",), version=version)
