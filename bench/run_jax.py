"""JAX: plain jax.numpy models; one jax.jit of the whole step (forward, grad, update).

    python bench/run_jax.py --workload W2 --json

Adam is written by hand (bench/fn_optim.py), optax is not used. Parameters and optimizer
state are donated to the jitted step, so the update happens in place. The GPT (W7) uses
jax.nn.dot_product_attention(is_causal=True) on (B, T, heads, head) arrays and
jax.nn.gelu(approximate=False); its layer norm is written out (biased variance, as torch).
"""

from __future__ import annotations

from typing import Any

import common
import fn_optim
from workloads import CNN, GPT, MLP, Workload, cnn_feature_shapes, gpt_layer_names, init_params, make_batch

jax = common.optional_import("jax")
jnp = common.optional_import("jax.numpy")

Params = dict[str, Any]


def _mish(x: Any) -> Any:
    return x * jnp.tanh(jax.nn.softplus(x))


def mlp(m: MLP, p: Params, x: Any) -> Any:
    act = jax.nn.relu if m.activation == "relu" else _mish
    n = len(m.sizes) - 1
    for i in range(n):
        x = x @ p[f"W{i}"] + p[f"b{i}"]
        if i < n - 1:
            x = act(x)
    return x


def _conv(x: Any, w: Any, b: Any, padding: int) -> Any:
    y = jax.lax.conv_general_dilated(x, w, (1, 1), [(padding, padding)] * 2,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + b[None, :, None, None]


def _max_pool(x: Any, s: int) -> Any:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, s, s), (1, 1, s, s), "VALID")


def cnn(m: CNN, p: Params, x: Any) -> Any:
    for i in range(len(cnn_feature_shapes(m)) - 1):
        x = _max_pool(jax.nn.relu(_conv(x, p[f"conv{i}_w"], p[f"conv{i}_b"], m.padding)), m.pool)
    return x.reshape(x.shape[0], -1) @ p["fc_w"] + p["fc_b"]


def lstm(p: Params, x: Any) -> Any:
    hid = p["W_hh"].shape[1]
    xw = jnp.swapaxes(x @ p["W_ih"].T + (p["b_ih"] + p["b_hh"]), 0, 1)  # time-major

    def cell(carry: tuple[Any, Any], xw_t: Any) -> tuple[tuple[Any, Any], None]:
        h, c = carry
        i, f, g, o = jnp.split(xw_t + h @ p["W_hh"].T, 4, axis=1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return (jax.nn.sigmoid(o) * jnp.tanh(c), c), None

    zeros = jnp.zeros((x.shape[0], hid), x.dtype)
    (h, _), _ = jax.lax.scan(cell, (zeros, zeros), xw)
    return h @ p["fc_w"] + p["fc_b"]


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * weight + bias


def gpt(m: GPT, p: Params, idx: Any) -> Any:
    """Logits (B*T, vocab) of the W7 GPT (see workloads.GPT)."""
    bsz, t = idx.shape
    c, h, d = m.embed, m.heads, m.head_dim
    x = p["wte"][idx] + p["wpe"]
    for layer in range(m.layers):
        n = gpt_layer_names(layer)
        qkv = _layer_norm(x, p[n["ln1_w"]], p[n["ln1_b"]], m.eps) @ p[n["attn_w"]] + p[n["attn_b"]]
        q, k, v = (z.reshape(bsz, t, h, d) for z in jnp.split(qkv, 3, axis=-1))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(bsz, t, c)
        x = x + (y @ p[n["proj_w"]] + p[n["proj_b"]])
        u = _layer_norm(x, p[n["ln2_w"]], p[n["ln2_b"]], m.eps) @ p[n["fc_w"]] + p[n["fc_b"]]
        x = x + (jax.nn.gelu(u, approximate=False) @ p[n["fc2_w"]] + p[n["fc2_b"]])
    x = _layer_norm(x, p["lnf_w"], p["lnf_b"], m.eps)
    return (x @ p["lm_w"]).reshape(bsz * t, m.vocab)


def forward(w: Workload, p: Params, x: Any) -> Any:
    if isinstance(w.model, GPT):
        return gpt(w.model, p, x)
    if isinstance(w.model, MLP):
        return mlp(w.model, p, x)
    if isinstance(w.model, CNN):
        return cnn(w.model, p, x)
    return lstm(p, x)


def loss(w: Workload, p: Params, x: Any, y: Any) -> Any:
    out = forward(w, p, x)
    if w.loss == "mse":
        return jnp.mean((out - y) ** 2)
    y = y.reshape(-1)  # the GPT's (B, T) labels, one per row of its (B*T, vocab) logits
    picked = jnp.take_along_axis(out, y[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(out, axis=1) - picked)


def make_step(w: Workload) -> Any:
    def train_step(p: Params, state: Params, x: Any, y: Any) -> tuple[Params, Params, Any]:
        value, grads = jax.value_and_grad(lambda q: loss(w, q, x, y))(p)
        p, state = fn_optim.update(w.optimizer, p, grads, state, jnp.sqrt)
        return p, state, value

    return jax.jit(train_step, donate_argnums=(0, 1))


class JaxTrainer:
    def __init__(self, w: Workload) -> None:
        self.params = {k: jnp.asarray(v) for k, v in init_params(w).items()}
        self.state = jax.tree.map(jnp.asarray, fn_optim.init_state(
            w.optimizer, self.params, jnp.zeros_like))
        self.x, self.y = (jnp.asarray(a) for a in make_batch(w))
        self.jitted = make_step(w)

    def step(self) -> Any:
        self.params, self.state, value = self.jitted(self.params, self.state, self.x, self.y)
        return value  # not waited for: to_float (float()) blocks at the end of a sample


def build(w: Workload, variant: str) -> common.Trainer:
    return common.Trainer(JaxTrainer(w).step)


if __name__ == "__main__":
    common.run_cli("jax", build, requires=("jax", "jax.numpy"),
                   version=lambda: f"{jax.__version__}, XLA on {jax.devices()[0].platform}")
