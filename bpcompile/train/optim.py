"""Optimizers, with PyTorch's update formulas, fused into the native train step.

An optimizer is data: its per-element state slots, the scalar hyperparameters it needs each
step (learning rate, bias corrections: `hyper_formula`, written once over the namespaces of
`bpcompile.train.formula` and printed to C into the update, which computes them from the step,
the learning rate and any running product that Python passes it each call),
and its update written as SymPy expressions of p, g, the slots and the hyperparameters. The code
generator prints those expressions into one loop over the flat parameter buffer. This module
imports SymPy only when an update or a formula is generated, so a built model loads without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

from .formula import NUMERIC
from .schedules import Constant, Schedule, as_schedule, schedule_from_config

Exprs = Any  # sympy expressions (SymPy is imported lazily)



def hyper_by_name(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-group hyperparameters (Optimizer.group_hyper) in one dict, group k's named `<name>_g<k>`."""
    return {(f"{n}_g{k}" if k else n): v for k, group in enumerate(groups) for n, v in group.items()}

class Optimizer:
    """Base class: subclasses set `kind`, `slots` and implement `hyper_formula` and `update`."""

    kind = ""
    slots: tuple[str, ...] = ()
    step_dependent = False  # whether the hyperparameters change with the step at a fixed rate (then the
    # runtime refills the hyper array every step; tests/test_optim_formulas.py checks it against the formulas)

    def __init__(self, lr: float | Schedule | Callable[[int], float], weight_decay: float = 0.0,
                 clip_norm: float | None = None, param_groups: list[dict[str, Any]] | None = None):
        self.lr = as_schedule(lr)
        self.weight_decay = _non_negative(weight_decay, "weight_decay")
        if clip_norm is not None and not (isinstance(clip_norm, int | float) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.param_groups = _param_groups(param_groups, self.weight_decay)
        self.products: dict[str, tuple[int, float]] = {}  # running products (formula.Numeric.product)

    # --- parameter groups ----------------------------------------------------------------
    def group_of(self, names: list[str]) -> dict[str, int]:
        """Group number of each parameter in `names` (0: the optimizer's own settings, k: the
        k-th entry of param_groups); a name that is not a parameter, or is in two groups, is an error."""
        groups = dict.fromkeys(names, 0)
        for k, group in enumerate(self.param_groups, 1):
            for name in group["params"]:
                if name not in groups:
                    raise ValueError(f"param_groups[{k - 1}] names {name!r}, which is not a parameter of the "
                                     f"model (its parameters: {list(names)})")
                if groups[name]:
                    raise ValueError(f"parameter {name!r} is in param_groups[{groups[name] - 1}] and "
                                     f"param_groups[{k - 1}]")
                groups[name] = k
        return groups

    def group(self, k: int) -> Optimizer:
        """The optimizer with group k's settings (k = 0: itself)."""
        if k == 0:
            return self
        clone = copy.copy(self)
        clone.weight_decay = self.param_groups[k - 1]["weight_decay"]
        clone.param_groups = []
        return clone

    # --- what the generated code needs ---------------------------------------------------
    def step_hyper(self, step: int, lr: float) -> dict[str, float]:
        """What the native update reads from its `hyper` array at step `step`: the step, the
        learning rate and the running products (`running_products`); the update computes its
        hyperparameters from them in C, printed from `hyper_formula` (see `all_hyper`)."""
        h = {"step": float(step), "lr": float(lr)}
        for name, factor in self.running_products().items():
            h[name] = NUMERIC.product(self.products, name, factor, step)
        return h

    def hyper_names(self) -> tuple[str, ...]:
        """The names of the C `hyper` array, as `step_hyper` fills it."""
        return ("step", "lr", *self.running_products())

    def running_products(self) -> dict[str, Callable[[Any, Any], Any]]:
        """The products over steps 1 .. t that hyper_formula reads with `m.product` ({name:
        factor(k, m)}): carried from step to step in Python and passed to C."""
        return {}

    def group_hyper(self, step: Any, lr: Any, m: Any) -> list[dict[str, Any]]:
        """The hyperparameters of step `step` in namespace `m` per parameter group: the
        optimizer's own (group 0), then each group's, with its lr_scale and weight decay."""
        if type(self).hyper is not Optimizer.hyper:
            raise ValueError(f"optimizer {type(self).__name__} overrides hyper(); its hyperparameters are printed "
                             "to C from hyper_formula(step, lr, m), so define that instead")
        out = [dict(self.hyper_formula(step, lr, m))]
        for k, group in enumerate(self.param_groups, 1):
            rate = lr if group["lr_scale"] == 1.0 else lr * group["lr_scale"]
            out.append(dict(self.group(k).hyper_formula(step, rate, m)))
        return out

    def all_hyper(self, step: Any, lr: Any, m: Any) -> dict[str, Any]:
        """Every hyperparameter of step `step` in namespace `m`, group k's named `<name>_g<k>`."""
        return hyper_by_name(self.group_hyper(step, lr, m))

    def hyper(self, step: int, lr: float) -> dict[str, float]:
        """Scalar hyperparameters of step `step` (counted from 1) as floats (the native update
        computes the same in C; this is for reading them)."""
        return self.hyper_formula(step, lr, NUMERIC)

    def hyper_formula(self, step: Any, lr: Any, m: Any) -> dict[str, Any]:
        """The hyperparameters of step `step` at rate `lr` in the math of namespace `m`
        (formula.NUMERIC: floats; formula.symbolic(): SymPy expressions)."""
        return {"lr": lr}

    def update(self, p, g, state: dict, h: dict) -> tuple[Exprs, dict]:
        """(new p, {slot: new value}) as SymPy expressions."""
        raise NotImplementedError

    def regularized(self, p, g):
        """The gradient with L2 weight decay folded in (PyTorch's weight_decay for SGD/Adam/RMSprop)."""
        return g + self.weight_decay * p if self.weight_decay else g

    # --- description and persistence -----------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = {"kind": self.kind, "lr": self.lr.config(), "weight_decay": self.weight_decay,
               "clip_norm": self.clip_norm}
        cfg.update(self._settings())
        if self.param_groups:
            cfg["param_groups"] = [dict(g, params=list(g["params"])) for g in self.param_groups]
        return cfg

    def _settings(self) -> dict[str, Any]:
        return {}

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (a constant one read directly: this runs every step)."""
        lr = self.lr
        return lr.lr if type(lr) is Constant else float(lr(step))

    def for_loss(self, loss: str) -> Optimizer:
        """The optimizer that trains on `loss`: this one (see PerLoss)."""
        return self

    def describe(self) -> str:
        """The settings that shape the generated update (not the learning rate, a runtime value)."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k not in ("kind", "lr"))
        return f"{type(self).__name__}({args})"

    def __repr__(self) -> str:
        return self.describe().replace("(", f"(lr={self.lr.config()!r}, ", 1)


def _non_negative(value: float, name: str) -> float:
    if not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _param_groups(groups: list[dict[str, Any]] | None, weight_decay: float) -> list[dict[str, Any]]:
    """param_groups as [{"params": [names], "weight_decay": float, "lr_scale": float}]; param
    nodes are replaced by their names, missing settings take the optimizer's."""
    if groups is None:
        return []
    if not isinstance(groups, list | tuple):
        raise ValueError(f"param_groups must be a list of dicts, got {type(groups).__name__}")
    out = []
    for k, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"param_groups[{k}] must be a dict with a 'params' list, got {group!r}")
        unknown = set(group) - {"params", "weight_decay", "lr_scale"}
        if unknown:
            raise ValueError(f"param_groups[{k}] has unknown settings {sorted(unknown)} "
                             "(a group sets 'params', 'weight_decay', 'lr_scale')")
        names = []
        for p in group["params"]:
            name = p if isinstance(p, str) else getattr(p, "attrs", {}).get("name") if getattr(p, "op", "") == "param" \
                else None
            if not isinstance(name, str):
                raise ValueError(f"param_groups[{k}]: {p!r} is neither a parameter name nor a parameter node")
            if name in names:
                raise ValueError(f"param_groups[{k}] names parameter {name!r} twice")
            names.append(name)
        out.append({"params": names,
                    "weight_decay": _non_negative(group.get("weight_decay", weight_decay),
                                                  f"param_groups[{k}] weight_decay"),
                    "lr_scale": _non_negative(group.get("lr_scale", 1.0), f"param_groups[{k}] lr_scale")})
    return out


def _unit(value: float, name: str) -> float:
    if not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class SGD(Optimizer):
    """p -= lr * d, with d = g (+ momentum buffer, Nesterov), as torch.optim.SGD."""

    kind = "sgd"

    def __init__(self, lr: Any = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 clip_norm: float | None = None, dampening: float = 0.0,
                 param_groups: list[dict[str, Any]] | None = None):
        super().__init__(lr, weight_decay, clip_norm, param_groups)
        self.momentum = _non_negative(momentum, "momentum")
        self.dampening = _non_negative(dampening, "dampening")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        self.slots = ("buf",) if self.momentum else ()
        self.step_dependent = bool(self.momentum)  # the first step starts the buffer

    def hyper_formula(self, step, lr, m):
        if not self.momentum:
            return {"lr": lr}
        first = step <= 1  # PyTorch starts the buffer at the first gradient, undamped
        return {"lr": lr, "mom": m.where(first, 0.0, self.momentum), "damp": m.where(first, 1.0, 1.0 - self.dampening)}

    def update(self, p, g, state, h):
        g = self.regularized(p, g)
        if not self.momentum:
            return p - h["lr"] * g, {}
        buf = h["mom"] * state["buf"] + h["damp"] * g
        direction = g + self.momentum * buf if self.nesterov else buf
        return p - h["lr"] * direction, {"buf": buf}

    def _settings(self):
        return {"momentum": self.momentum, "nesterov": self.nesterov, "dampening": self.dampening}


class Adam(Optimizer):
    """Adam with bias correction, as torch.optim.Adam (weight_decay is L2 added to g)."""

    kind = "adam"
    slots = ("m", "v")
    decoupled = False
    step_dependent = True  # bias corrections

    def __init__(self, lr: Any = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_norm: float | None = None, amsgrad: bool = False,
                 param_groups: list[dict[str, Any]] | None = None):
        super().__init__(lr, weight_decay, clip_norm, param_groups)
        self.betas = (_unit(betas[0], "betas[0]"), _unit(betas[1], "betas[1]"))
        self.eps = _non_negative(eps, "eps")
        self.amsgrad = bool(amsgrad)
        self.slots = ("m", "v", "vmax") if self.amsgrad else ("m", "v")

    def hyper_formula(self, step, lr, m):
        b1, b2 = self.betas
        h = {"lr": lr, "step_size": lr / (1 - b1**step), "sqrt_bc2": m.sqrt(1 - b2**step)}
        if self.decoupled:
            h["decay"] = 1 - lr * self.weight_decay
        return h

    def update(self, p, g, state, h):
        import sympy as sp
        b1, b2 = self.betas
        if self.decoupled:
            p = p * h["decay"]
        else:
            g = self.regularized(p, g)
        m = b1 * state["m"] + (1 - b1) * g
        v = b2 * state["v"] + (1 - b2) * g**2
        if not self.amsgrad:
            return p - h["step_size"] * m / (sp.sqrt(v) / h["sqrt_bc2"] + self.eps), {"m": m, "v": v}
        vmax = sp.Max(state["vmax"], v)  # torch.maximum(max_exp_avg_sq, exp_avg_sq)
        return p - h["step_size"] * m / (sp.sqrt(vmax) / h["sqrt_bc2"] + self.eps), {"m": m, "v": v, "vmax": vmax}

    def _settings(self):
        return {"betas": list(self.betas), "eps": self.eps, "amsgrad": self.amsgrad}


class AdamW(Adam):
    """Adam with decoupled weight decay p *= 1 - lr * wd, as torch.optim.AdamW."""

    kind = "adamw"
    decoupled = True

    def __init__(self, lr: Any = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, clip_norm: float | None = None, amsgrad: bool = False,
                 param_groups: list[dict[str, Any]] | None = None):
        super().__init__(lr, betas, eps, weight_decay, clip_norm, amsgrad, param_groups)


class RMSprop(Optimizer):
    """v = alpha v + (1-alpha) g^2; p -= lr g / (sqrt(v) + eps), optional momentum; as torch.optim.RMSprop."""

    kind = "rmsprop"

    def __init__(self, lr: Any = 1e-2, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0,
                 weight_decay: float = 0.0, clip_norm: float | None = None, centered: bool = False,
                 param_groups: list[dict[str, Any]] | None = None):
        super().__init__(lr, weight_decay, clip_norm, param_groups)
        self.alpha = _unit(alpha, "alpha")
        self.eps = _non_negative(eps, "eps")
        self.momentum = _non_negative(momentum, "momentum")
        self.centered = bool(centered)
        self.slots = ("v",) + (("gavg",) if self.centered else ()) + (("buf",) if self.momentum else ())

    def update(self, p, g, state, h):
        import sympy as sp
        g = self.regularized(p, g)
        v = self.alpha * state["v"] + (1 - self.alpha) * g**2
        new = {"v": v}
        if self.centered:  # the variance estimate: v - (running mean of g)^2
            new["gavg"] = state["gavg"] + (1 - self.alpha) * (g - state["gavg"])
            step = g / (sp.sqrt(v - new["gavg"] ** 2) + self.eps)
        else:
            step = g / (sp.sqrt(v) + self.eps)
        if not self.momentum:
            return p - h["lr"] * step, new
        new["buf"] = self.momentum * state["buf"] + step
        return p - h["lr"] * new["buf"], new

    def _settings(self):
        return {"alpha": self.alpha, "eps": self.eps, "momentum": self.momentum, "centered": self.centered}


class Adagrad(Optimizer):
    """sum += g^2; p -= lr / (1 + (t-1) lr_decay) * g / (sqrt(sum) + eps); as torch.optim.Adagrad."""

    kind = "adagrad"
    slots = ("sum",)

    def __init__(self, lr: Any = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10,
                 clip_norm: float | None = None, param_groups: list[dict[str, Any]] | None = None):
        super().__init__(lr, weight_decay, clip_norm, param_groups)
        self.lr_decay = _non_negative(lr_decay, "lr_decay")
        self.eps = _non_negative(eps, "eps")
        self.step_dependent = bool(self.lr_decay)

    def hyper_formula(self, step, lr, m):
        return {"clr": lr / (1 + (step - 1) * self.lr_decay)}

    def update(self, p, g, state, h):
        import sympy as sp
        g = self.regularized(p, g)
        acc = state["sum"] + g**2
        return p - h["clr"] * g / (sp.sqrt(acc) + self.eps), {"sum": acc}

    def _settings(self):
        return {"lr_decay": self.lr_decay, "eps": self.eps}


class Adadelta(Optimizer):
    """v = rho v + (1-rho) g^2; d = sqrt(u + eps) / sqrt(v + eps) g; u = rho u + (1-rho) d^2;
    p -= lr d; as torch.optim.Adadelta."""

    kind = "adadelta"
    slots = ("v", "u")

    def __init__(self, lr: Any = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0,
                 clip_norm: float | None = None, param_groups: list[dict[str, Any]] | None = None):
        super().__init__(lr, weight_decay, clip_norm, param_groups)
        self.rho = _unit(rho, "rho")
        self.eps = _non_negative(eps, "eps")

    def update(self, p, g, state, h):
        import sympy as sp
        g = self.regularized(p, g)
        v = self.rho * state["v"] + (1 - self.rho) * g**2
        delta = sp.sqrt(state["u"] + self.eps) / sp.sqrt(v + self.eps) * g
        u = self.rho * state["u"] + (1 - self.rho) * delta**2
        return p - h["lr"] * delta, {"v": v, "u": u}

    def _settings(self):
        return {"rho": self.rho, "eps": self.eps}


class Adamax(Optimizer):
    """m = b1 m + (1-b1) g; u = max(b2 u, |g| + eps); p -= lr / (1 - b1^t) m / u; as torch.optim.Adamax."""

    kind = "adamax"
    slots = ("m", "u")
    step_dependent = True

    def __init__(self, lr: Any = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_norm: float | None = None,
                 param_groups: list[dict[str, Any]] | None = None):
        super().__init__(lr, weight_decay, clip_norm, param_groups)
        self.betas = (_unit(betas[0], "betas[0]"), _unit(betas[1], "betas[1]"))
        self.eps = _non_negative(eps, "eps")

    def hyper_formula(self, step, lr, m):
        return {"step_size": lr / (1 - self.betas[0] ** step)}

    def update(self, p, g, state, h):
        import sympy as sp
        b1, b2 = self.betas
        g = self.regularized(p, g)
        m = state["m"] + (1 - b1) * (g - state["m"])
        u = sp.Max(b2 * state["u"], sp.Abs(g) + self.eps)
        return p - h["step_size"] * m / u, {"m": m, "u": u}

    def _settings(self):
        return {"betas": list(self.betas), "eps": self.eps}


class NAdam(Optimizer):
    """Adam with Nesterov momentum and torch's momentum-decay schedule mu_t, as torch.optim.NAdam."""

    kind = "nadam"
    slots = ("m", "v")
    step_dependent = True

    def __init__(self, lr: Any = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False,
                 clip_norm: float | None = None, param_groups: list[dict[str, Any]] | None = None):
        super().__init__(lr, weight_decay, clip_norm, param_groups)
        self.betas = (_unit(betas[0], "betas[0]"), _unit(betas[1], "betas[1]"))
        self.eps = _non_negative(eps, "eps")
        self.momentum_decay = _non_negative(momentum_decay, "momentum_decay")
        self.decoupled_weight_decay = bool(decoupled_weight_decay)

    def _mu(self, step: Any, m: Any) -> Any:
        """The momentum of step `step`: beta1 (1 - 0.5 * 0.96^(step * momentum_decay))."""
        return self.betas[0] * (1.0 - 0.5 * 0.96 ** (step * self.momentum_decay))

    def running_products(self):
        return {"mu_product": self._mu}  # mu_1 ... mu_t, which torch keeps as per-parameter state

    def hyper_formula(self, step, lr, m):
        mu, mu_next = self._mu(step, m), self._mu(step + 1, m)
        mu_product = m.product(self.products, "mu_product", self._mu, step)
        h = {"g_coef": lr * (1.0 - mu) / (1.0 - mu_product),
             "m_coef": lr * mu_next / (1.0 - mu_product * mu_next), "bc2": 1 - self.betas[1] ** step}
        if self.decoupled_weight_decay:
            h["decay"] = 1 - lr * self.weight_decay
        return h

    def update(self, p, g, state, h):
        import sympy as sp
        b1, b2 = self.betas
        if self.decoupled_weight_decay:
            p = p * h["decay"]
        else:
            g = self.regularized(p, g)
        m = state["m"] + (1 - b1) * (g - state["m"])
        v = b2 * state["v"] + (1 - b2) * g**2
        denom = sp.sqrt(v / h["bc2"]) + self.eps
        return p - h["g_coef"] * g / denom - h["m_coef"] * m / denom, {"m": m, "v": v}

    def _settings(self):
        return {"betas": list(self.betas), "eps": self.eps, "momentum_decay": self.momentum_decay,
                "decoupled_weight_decay": self.decoupled_weight_decay}


OPTIMIZERS: dict[str, type[Optimizer]] = {c.kind: c for c in (SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta,
                                                               Adamax, NAdam)}


class PerLoss:
    """One optimizer per named loss (a GAN's discriminator and generator, TTUR): what
    `bp.compile(g, optimizer={"d": Adam(...), "g": Adam(...)})` makes of a dict. Each loss's train
    step runs its own optimizer's update with its own step count; the losses must train disjoint
    parameters, so that each parameter's optimizer state belongs to one optimizer."""

    kind = "per_loss"
    clip_norm = None
    param_groups: list = []

    def __init__(self, optimizers: dict[str, Optimizer]):
        if not isinstance(optimizers, dict) or not optimizers:
            raise TypeError("per-loss optimizers must be a non-empty dict of loss name -> bp.optim optimizer")
        for name, opt in optimizers.items():
            if not isinstance(name, str) or not isinstance(opt, Optimizer):
                raise TypeError(f"per-loss optimizers: {name!r} maps to {type(opt).__name__}; expected a loss "
                                "name mapped to a bp.optim optimizer")
        self.optimizers = dict(optimizers)

    def for_loss(self, loss: str) -> Optimizer:
        return self.optimizers[loss]

    @property
    def slots(self) -> tuple[str, ...]:
        """Enough state slots for the optimizer with the most (each parameter uses its own's)."""
        return max((o.slots for o in self.optimizers.values()), key=len)

    def hyper_names(self) -> tuple[str, ...]:
        return max((o.hyper_names() for o in self.optimizers.values()), key=len)  # each loss's own array

    def check_losses(self, losses: dict[str, list[str]]) -> None:
        """Every loss of the graph ({name: trained params}) has an optimizer, no optimizer is for
        a loss the graph lacks, and no parameter is trained by two of them."""
        missing, unknown = sorted(set(losses) - set(self.optimizers)), sorted(set(self.optimizers) - set(losses))
        if missing or unknown:
            raise ValueError(f"per-loss optimizers must name every loss of the graph {sorted(losses)} exactly: "
                             + "; ".join(([f"no optimizer for {missing}"] if missing else [])
                                         + ([f"no loss named {unknown}"] if unknown else [])))
        owner: dict[str, str] = {}
        for loss, params in losses.items():
            for p in params:
                if p in owner and self.optimizers[owner[p]] is not self.optimizers[loss]:
                    raise ValueError(f"parameter {p!r} is trained by loss {owner[p]!r} and loss {loss!r} with "
                                     "different optimizers; a parameter's optimizer state belongs to one optimizer "
                                     "(give both losses the same optimizer object, or train disjoint parameters)")
                owner.setdefault(p, loss)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "losses": {n: o.config() for n, o in self.optimizers.items()}}

    def describe(self) -> str:
        return "PerLoss(" + ", ".join(f"{n}={o.describe()}" for n, o in self.optimizers.items()) + ")"

    def __repr__(self) -> str:
        return "PerLoss(" + ", ".join(f"{n}={o!r}" for n, o in self.optimizers.items()) + ")"


def as_optimizer(optimizer: Any) -> Optimizer | PerLoss | None:
    """An optimizer, a PerLoss, a dict of them per loss, or None."""
    if optimizer is None or isinstance(optimizer, Optimizer | PerLoss):
        return optimizer
    if isinstance(optimizer, dict):
        return PerLoss(optimizer)
    raise TypeError(f"optimizer must be a bp.optim optimizer or a dict of them per loss, got "
                    f"{type(optimizer).__name__}")


def from_config(cfg: dict[str, Any]) -> Optimizer | PerLoss:
    """Rebuild an optimizer from `Optimizer.config()` (as stored beside a built model)."""
    cfg = dict(cfg)
    if cfg.get("kind") == PerLoss.kind:
        return PerLoss({n: from_config(c) for n, c in cfg["losses"].items()})
    cls = OPTIMIZERS[cfg.pop("kind")]
    cfg["lr"] = schedule_from_config(cfg["lr"])
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return cls(**cfg)
