"""Independent NumPy (float64) reference of PyTorch's optimizers.

Used by the tests as the oracle for the optimizer updates that bpcompile
generates in C.  It imports no torch: every update is written out from the
algorithms documented for ``torch.optim`` (SGD, Adam, AdamW, RMSprop) and for
``torch.nn.utils.clip_grad_norm_``.

Interface::

    opt = Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
               clip_norm=None)
    opt.step(params, grads)   # dict[str, np.ndarray] each; params updated in place
    opt.state[name]           # dict of per-parameter state (float64 arrays)

Conventions:

* All arithmetic is float64.  A parameter array of another float dtype is
  written back in place (cast to its dtype); the state stays float64.
* ``grads`` is never modified; clipping works on copies.
* A parameter with no entry in ``grads`` is skipped (its state is untouched),
  as torch skips a parameter whose ``.grad`` is ``None``.  A gradient whose
  name is not in ``params`` raises ``KeyError``.
* Hyper-parameters are plain attributes (``opt.lr = ...`` between steps acts
  like changing ``param_group["lr"]``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "CLIP_EPS",
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "AdamW",
    "Optimizer",
    "RMSprop",
    "clip_grad_norm",
    "global_grad_norm",
]

#: eps of ``torch.nn.utils.clip_grad_norm_`` (added to the total norm).
CLIP_EPS = 1e-6


def global_grad_norm(grads: dict[str, np.ndarray]) -> float:
    """L2 norm of all gradients taken together: ``sqrt(sum_i sum(g_i**2))``."""
    total = 0.0
    for g in grads.values():
        g64 = np.asarray(g, dtype=np.float64)
        total += float(np.sum(g64 * g64))
    return math.sqrt(total)


def clip_grad_norm(
    grads: dict[str, np.ndarray], max_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Global gradient-norm clipping, as ``torch.nn.utils.clip_grad_norm_``.

    ``total_norm = ||(g_1, ..., g_n)||_2``; ``scale = max_norm / (total_norm +
    1e-6)``; every gradient is multiplied by ``scale`` only when ``scale < 1``
    (torch multiplies by ``min(scale, 1)``, which is the same).

    Returns ``(clipped copies as float64, total_norm)``; the input is untouched.
    """
    total_norm = global_grad_norm(grads)
    scale = max_norm / (total_norm + CLIP_EPS)
    out = {}
    for name, g in grads.items():
        g64 = np.array(g, dtype=np.float64)  # copy
        if scale < 1.0:
            g64 = g64 * scale
        out[name] = g64
    return out, total_norm


class Optimizer:
    """Common driver: optional global clipping, then a per-parameter update.

    Subclasses implement ``_update(p, g, state) -> new_p`` on float64 arrays,
    where ``g`` is the (possibly clipped) gradient and ``state`` the
    parameter's state dict, mutated in place.
    """

    def __init__(self, clip_norm: float | None = None):
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        self.clip_norm = clip_norm
        self.state: dict[str, dict] = {}
        #: total gradient norm seen by the last ``step`` (``None`` without clipping)
        self.last_total_norm: float | None = None

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Apply one update to every parameter that has a gradient, in place."""
        for name in grads:
            if name not in params:
                raise KeyError(f"gradient for unknown parameter {name!r}")
        if self.clip_norm is not None:
            g64s, self.last_total_norm = clip_grad_norm(grads, self.clip_norm)
        else:
            g64s = {k: np.array(v, dtype=np.float64) for k, v in grads.items()}
        for name, p in params.items():
            if name not in g64s:
                continue
            p64 = np.array(p, dtype=np.float64)
            g64 = g64s[name]
            if g64.shape != p64.shape:
                raise ValueError(
                    f"grad shape {g64.shape} != param shape {p64.shape} for {name!r}"
                )
            state = self.state.setdefault(name, {})
            new_p = self._update(p64, g64, state)
            if isinstance(p, np.ndarray):
                p[...] = new_p
            else:  # a Python scalar cannot be updated in place: replace the entry
                params[name] = new_p

    def _update(self, p: np.ndarray, g: np.ndarray, state: dict) -> np.ndarray:
        raise NotImplementedError


class SGD(Optimizer):
    """``torch.optim.SGD`` (maximize=False).

    Per step, with lr γ, weight decay λ, momentum μ, dampening τ::

        g = g + λ p                       (if λ != 0)
        if μ != 0:
            b = g                         (first step: no dampening)
            b = μ b + (1 - τ) g           (later steps)
            g = g + μ b   if nesterov else   g = b
        p = p - γ g

    State: ``momentum_buffer`` (only when μ != 0).
    """

    def __init__(
        self,
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        nesterov: bool = False,
        weight_decay: float = 0,
        clip_norm: float | None = None,
    ):
        super().__init__(clip_norm)
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.nesterov = nesterov
        self.weight_decay = weight_decay

    def _update(self, p, g, state):
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = g.copy()
            else:
                buf = self.momentum * buf + (1 - self.dampening) * g
            state["momentum_buffer"] = buf
            g = g + self.momentum * buf if self.nesterov else buf
        return p - self.lr * g


class Adam(Optimizer):
    """``torch.optim.Adam`` (amsgrad=False, maximize=False).

    Per step t = 1, 2, ... with lr γ, betas (β1, β2), eps ε, weight decay λ::

        g = g + λ p                       (L2 penalty, if λ != 0)
        m = β1 m + (1 - β1) g
        v = β2 v + (1 - β2) g²
        bc1 = 1 - β1^t,  bc2 = 1 - β2^t
        denom = sqrt(v) / sqrt(bc2) + ε
        p = p - (γ / bc1) m / denom

    State: ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v), m and v start at 0.
    """

    #: True in AdamW: decay the parameter instead of adding λ p to the gradient.
    decoupled_weight_decay = False

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        clip_norm: float | None = None,
    ):
        super().__init__(clip_norm)
        beta1, beta2 = betas
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.lr = lr
        self.betas = (beta1, beta2)
        self.eps = eps
        self.weight_decay = weight_decay

    def _update(self, p, g, state):
        beta1, beta2 = self.betas
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p)
            state["exp_avg_sq"] = np.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        if self.weight_decay != 0:
            if self.decoupled_weight_decay:
                p = p * (1 - self.lr * self.weight_decay)
            else:
                g = g + self.weight_decay * p
        m = beta1 * state["exp_avg"] + (1 - beta1) * g
        v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        state["exp_avg"] = m
        state["exp_avg_sq"] = v
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        step_size = self.lr / bias_correction1
        denom = np.sqrt(v) / math.sqrt(bias_correction2) + self.eps
        return p - step_size * (m / denom)


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay.

    As :class:`Adam` with λ = 0 in the gradient, but first ``p = p (1 - γ λ)``
    (before the moments are updated).  Default ``weight_decay=1e-2``.
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        clip_norm: float | None = None,
    ):
        super().__init__(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip_norm=clip_norm
        )


class RMSprop(Optimizer):
    """``torch.optim.RMSprop`` (centered=False, maximize=False).

    Per step with lr γ, smoothing α, eps ε, weight decay λ, momentum μ::

        g = g + λ p                       (if λ != 0)
        v = α v + (1 - α) g²              (v starts at 0)
        avg = sqrt(v) + ε
        if μ > 0:  b = μ b + g / avg;  p = p - γ b     (b starts at 0)
        else:      p = p - γ g / avg

    State: ``step`` (int), ``square_avg`` (v), ``momentum_buffer`` (only when μ > 0).
    """

    def __init__(
        self,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        momentum: float = 0,
        weight_decay: float = 0,
        clip_norm: float | None = None,
    ):
        super().__init__(clip_norm)
        if lr < 0 or eps < 0 or momentum < 0 or weight_decay < 0 or alpha < 0:
            raise ValueError("lr, alpha, eps, momentum and weight_decay must be >= 0")
        self.lr = lr
        self.alpha = alpha
        self.eps = eps
        self.momentum = momentum
        self.weight_decay = weight_decay

    def _update(self, p, g, state):
        if not state:
            state["step"] = 0
            state["square_avg"] = np.zeros_like(p)
            if self.momentum > 0:
                state["momentum_buffer"] = np.zeros_like(p)
        state["step"] += 1
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        v = self.alpha * state["square_avg"] + (1 - self.alpha) * g * g
        state["square_avg"] = v
        avg = np.sqrt(v) + self.eps
        if self.momentum > 0:
            buf = self.momentum * state["momentum_buffer"] + g / avg
            state["momentum_buffer"] = buf
            return p - self.lr * buf
        return p - self.lr * (g / avg)


#: name -> class, for tests parametrised by optimizer name.
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "adam": Adam,
    "adamw": AdamW,
    "rmsprop": RMSprop,
}


# ---------------------------------------------------------------- more of torch.optim
# (Adam's and RMSprop's extra options are subclasses so the classes above stay as they are)


class AdamAmsgrad(Adam):
    """``torch.optim.Adam(amsgrad=True)`` (AdamW with ``decoupled_weight_decay``): the
    denominator uses ``vmax = max(vmax, v)`` (state ``max_exp_avg_sq``, from 0)."""

    def _update(self, p, g, state):
        beta1, beta2 = self.betas
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p),
                         max_exp_avg_sq=np.zeros_like(p))
        state["step"] += 1
        t = state["step"]
        if self.weight_decay != 0:
            if self.decoupled_weight_decay:
                p = p * (1 - self.lr * self.weight_decay)
            else:
                g = g + self.weight_decay * p
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * g
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        state["max_exp_avg_sq"] = np.maximum(state["max_exp_avg_sq"], state["exp_avg_sq"])
        denom = np.sqrt(state["max_exp_avg_sq"]) / math.sqrt(1 - beta2**t) + self.eps
        return p - self.lr / (1 - beta1**t) * (state["exp_avg"] / denom)


class AdamWAmsgrad(AdamAmsgrad):
    """``torch.optim.AdamW(amsgrad=True)``."""

    decoupled_weight_decay = True


class RMSpropCentered(RMSprop):
    """``torch.optim.RMSprop(centered=True)``: ``gavg = α gavg + (1-α) g`` and the
    denominator is ``sqrt(v - gavg²) + ε``."""

    def _update(self, p, g, state):
        if not state:
            state.update(step=0, square_avg=np.zeros_like(p), grad_avg=np.zeros_like(p),
                         momentum_buffer=np.zeros_like(p))
        state["step"] += 1
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        state["square_avg"] = self.alpha * state["square_avg"] + (1 - self.alpha) * g * g
        state["grad_avg"] = self.alpha * state["grad_avg"] + (1 - self.alpha) * g
        avg = np.sqrt(state["square_avg"] - state["grad_avg"] ** 2) + self.eps
        if self.momentum > 0:
            state["momentum_buffer"] = self.momentum * state["momentum_buffer"] + g / avg
            return p - self.lr * state["momentum_buffer"]
        return p - self.lr * (g / avg)


class Adagrad(Optimizer):
    """``torch.optim.Adagrad`` (initial_accumulator_value=0): ``clr = γ / (1 + (t-1) lr_decay)``,
    ``sum += g²``, ``p -= clr g / (sqrt(sum) + ε)``."""

    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, clip_norm=None):
        super().__init__(clip_norm)
        self.lr, self.lr_decay, self.weight_decay, self.eps = lr, lr_decay, weight_decay, eps

    def _update(self, p, g, state):
        if not state:
            state.update(step=0, sum=np.zeros_like(p))
        state["step"] += 1
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        clr = self.lr / (1 + (state["step"] - 1) * self.lr_decay)
        state["sum"] = state["sum"] + g * g
        return p - clr * g / (np.sqrt(state["sum"]) + self.eps)


class Adadelta(Optimizer):
    """``torch.optim.Adadelta``: ``v = ρ v + (1-ρ) g²``, ``d = sqrt(u + ε) / sqrt(v + ε) g``,
    ``u = ρ u + (1-ρ) d²``, ``p -= γ d``."""

    def __init__(self, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, clip_norm=None):
        super().__init__(clip_norm)
        self.lr, self.rho, self.eps, self.weight_decay = lr, rho, eps, weight_decay

    def _update(self, p, g, state):
        if not state:
            state.update(square_avg=np.zeros_like(p), acc_delta=np.zeros_like(p))
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        state["square_avg"] = self.rho * state["square_avg"] + (1 - self.rho) * g * g
        delta = np.sqrt(state["acc_delta"] + self.eps) / np.sqrt(state["square_avg"] + self.eps) * g
        state["acc_delta"] = self.rho * state["acc_delta"] + (1 - self.rho) * delta * delta
        return p - self.lr * delta


class Adamax(Optimizer):
    """``torch.optim.Adamax``: ``m = β1 m + (1-β1) g``, ``u = max(β2 u, |g| + ε)``,
    ``p -= γ / (1 - β1^t) m / u``."""

    def __init__(self, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_norm=None):
        super().__init__(clip_norm)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def _update(self, p, g, state):
        beta1, beta2 = self.betas
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(p), exp_inf=np.zeros_like(p))
        state["step"] += 1
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * g
        state["exp_inf"] = np.maximum(beta2 * state["exp_inf"], np.abs(g) + self.eps)
        return p - self.lr / (1 - beta1 ** state["step"]) * state["exp_avg"] / state["exp_inf"]


class NAdam(Optimizer):
    """``torch.optim.NAdam``: ``μ_t = β1 (1 - 0.5·0.96^(t ψ))`` (ψ = momentum_decay), ``Π_t =
    μ_1 ⋯ μ_t``; ``denom = sqrt(v / (1 - β2^t)) + ε``;
    ``p -= γ (1-μ_t)/(1-Π_t) g / denom + γ μ_{t+1}/(1-Π_t μ_{t+1}) m / denom``."""

    def __init__(self, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, clip_norm=None):
        super().__init__(clip_norm)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.momentum_decay, self.decoupled_weight_decay = momentum_decay, decoupled_weight_decay

    def _update(self, p, g, state):
        beta1, beta2 = self.betas
        if not state:
            state.update(step=0, mu_product=1.0, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p))
        state["step"] += 1
        t = state["step"]
        if self.weight_decay != 0:
            if self.decoupled_weight_decay:
                p = p * (1 - self.lr * self.weight_decay)
            else:
                g = g + self.weight_decay * p
        mu = beta1 * (1 - 0.5 * 0.96 ** (t * self.momentum_decay))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * self.momentum_decay))
        state["mu_product"] *= mu
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * g
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        denom = np.sqrt(state["exp_avg_sq"] / (1 - beta2**t)) + self.eps
        p = p - self.lr * (1 - mu) / (1 - state["mu_product"]) * g / denom
        return p - self.lr * mu_next / (1 - state["mu_product"] * mu_next) * state["exp_avg"] / denom


OPTIMIZERS.update(adagrad=Adagrad, adadelta=Adadelta, adamax=Adamax, nadam=NAdam)
__all__ += ["Adadelta", "Adagrad", "AdamAmsgrad", "AdamWAmsgrad", "Adamax", "NAdam", "RMSpropCentered"]
