"""LRNN modules (Maharaj & Nair, "Deep Learning with Learnable Product-Structured Activations").

`LRNNLayer` is the product activation phi (..., rank) of the fused op `lrnn_product`; `LRNN` stacks such layers,
each followed by a LayerNorm, and ends with a linear map `S_out`. `LRNN(d, [r], out, dbar, layer_norm=False)` is the
shallow LRNN  y = S_out(phi(x)).

Initialisation (Lemma 1 of the paper: with gamma = dbar^-1/2 and zero-mean g, the activation variance stays bounded
whatever dbar). What is chosen here and why:
- weight and bias ~ U(-b, b) with b = sqrt(3 / (in_features + 1)) / omega: the d inputs and the constant 1 of the
  bias contribute equally, so Var(omega * z) = 1 for inputs of unit second moment (a LayerNorm's output), and
  omega * z is symmetric about 0 for any input x. omega is 1 except for "sin", where this is SIREN's rule of keeping
  sin's argument of unit order (its hidden layers use sqrt(6 / d) / omega); a first layer on raw coordinates that
  should see high frequencies can be re-initialised by the user.
- "mlp": g(z) = sum_i a_i tanh(w_i z + c_i) with a ~ N(0, 1 / h) (zero mean, small: Var g <= 1), w ~ N(0, 1),
  c ~ U(-1, 1).
- Every g here is odd ("sin", "spder", "arctan", "tanh") or has zero-mean output weights a ("mlp"), so given x each
  g(z_lj) has mean 0 (the weights are symmetric), and the dbar components of a neuron are independent given x
  (distinct weight rows). Hence E[phi_l | x] = 1 and E[phi_l^2 | x] = prod_j (1 + E[g^2] / dbar) <= exp(max E[g^2]).
  With Var(omega z) = 1, E[g^2] <= 1 for every activation: |g| <= 1 for sin and tanh, |g| <= |z| for arctan,
  g^2 <= |z| for spder (E|z| <= 1), and E[g^2] = sum_i E[a_i^2] t_i^2 <= 1 for mlp (over the initialisation of a).
  So phi has mean 1 and variance at most e - 1 ~ 1.7, for every dbar. A LayerNorm after each layer brings the next
  layer's input back to unit second moment; without it that moment is 1 + Var(phi) <= e, Var(omega z) grows to at
  most e, and the same argument bounds the next layer (tests/test_lrnn.py checks 8 layers, with and without).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.lrnn import lrnn_product
from ..ops.lrnn.common import ACTIVATIONS, MAX_HIDDEN

DEFAULT_HIDDEN = 4  # the mlp activation's hidden width when none is given


class LRNNLayer(nn.Module):
    """x (..., in_features) -> phi (..., rank), phi_l = prod_j (1 + gamma * g(z_lj)), z = x @ weight.T + bias viewed
    as (..., rank, dbar) (weight row l * dbar + j). Parameters: `weight` (rank * dbar, in_features), `bias`
    (rank * dbar,) when `bias`, and for activation "mlp" `g_params` (3, rank, dbar, hidden) = stack([a, w, c]).
    gamma None is dbar ** -0.5; omega is used by "sin" only. Initialisation: see the module docstring. `backend`
    (None = auto, "reference", "triton" or "cuda") is passed to the op on every call."""

    def __init__(self, in_features: int, rank: int, dbar: int, activation: str = "sin", omega: float = 1.0,
                 bias: bool = True, hidden: int | None = None, *, gamma: float | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("rank", rank), ("dbar", dbar)):
            _checks.check_positive_int(name, value)
        _checks.check_choice("activation", activation, ACTIVATIONS)
        omega = _checks.check_finite_float("omega", omega)
        if activation != "sin" and omega != 1.0:
            raise ValueError(f"omega scales z for activation 'sin' only; activation {activation!r} needs "
                             f"omega=1.0, got {omega!r}")
        if omega == 0.0:
            raise ValueError("omega must be nonzero (it scales the initial weights by 1 / omega)")
        if activation == "mlp":
            hidden = DEFAULT_HIDDEN if hidden is None else hidden
            _checks.check_positive_int("hidden", hidden)
            if hidden > MAX_HIDDEN:
                raise ValueError(f"hidden must be <= {MAX_HIDDEN}, got {hidden}")
        elif hidden is not None:
            raise ValueError(f"hidden is the width of the 'mlp' activation; pass None for activation {activation!r}")
        if gamma is not None:
            gamma = _checks.check_finite_float("gamma", gamma)
        self.in_features, self.rank, self.dbar = in_features, rank, dbar
        self.activation, self.omega, self.gamma, self.hidden = activation, omega, gamma, hidden
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(rank * dbar, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(rank * dbar, **factory)) if bias else None
        self.g_params = nn.Parameter(torch.empty(3, rank, dbar, hidden, **factory)) if activation == "mlp" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = math.sqrt(3 / (self.in_features + 1)) / abs(self.omega)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
            if self.g_params is not None:
                self.g_params[0].normal_(0.0, 1 / math.sqrt(self.hidden))  # a
                self.g_params[1].normal_(0.0, 1.0)  # w
                self.g_params[2].uniform_(-1.0, 1.0)  # c

    def forward(self, x: Tensor) -> Tensor:
        return lrnn_product(x, self.weight, self.bias, rank=self.rank, dbar=self.dbar, activation=self.activation,
                            omega=self.omega, gamma=self.gamma, g_params=self.g_params, backend=self.backend)

    def extra_repr(self) -> str:
        extra = f", hidden={self.hidden}" if self.hidden is not None else ""
        omega = f", omega={self.omega}" if self.activation == "sin" else ""
        return (f"in_features={self.in_features}, rank={self.rank}, dbar={self.dbar}, "
                f"activation={self.activation!r}{omega}{extra}, bias={self.bias is not None}")


class LRNN(nn.Module):
    """Deep LRNN: x (..., in_features) -> (..., out_features) through LRNNLayers of ranks `hidden_ranks`
    (r_0 = in_features -> r_1 -> ... -> r_L), each followed by a LayerNorm(r_i) (`layer_norm`, else nothing), then
    `S_out` = nn.Linear(r_L, out_features). Submodules `layers`, `norms` (ModuleLists) and `S_out`. The remaining
    arguments are every layer's (LRNNLayer)."""

    def __init__(self, in_features: int, hidden_ranks: Sequence[int], out_features: int, dbar: int,
                 activation: str = "sin", omega: float = 1.0, layer_norm: bool = True, bias: bool = True,
                 hidden: int | None = None, *, gamma: float | None = None, backend: str | None = None, device=None,
                 dtype=None):
        super().__init__()
        hidden_ranks = list(hidden_ranks)
        if not hidden_ranks:
            raise ValueError("hidden_ranks must list at least one rank")
        _checks.check_positive_int("out_features", out_features)
        factory = dict(device=device, dtype=dtype)
        widths = [in_features, *hidden_ranks]
        self.layers = nn.ModuleList(
            LRNNLayer(widths[i], widths[i + 1], dbar, activation, omega, bias, hidden, gamma=gamma, backend=backend,
                      **factory) for i in range(len(hidden_ranks)))
        self.norms = nn.ModuleList(nn.LayerNorm(r, **factory) if layer_norm else nn.Identity() for r in hidden_ranks)
        self.S_out = nn.Linear(hidden_ranks[-1], out_features, **factory)

    def forward(self, x: Tensor) -> Tensor:
        for layer, norm in zip(self.layers, self.norms):
            x = norm(layer(x))
        return self.S_out(x)


__all__ = ["LRNN", "LRNNLayer"]
