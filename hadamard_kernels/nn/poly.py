"""Polynomial (product-chain) modules.

`CCP` and `NCP` are drop-ins for the Π-net classifiers of the Hadamard-product survey's instructional code
(arXiv 2504.13112, §S.2): same constructor arguments, same submodules and `state_dict` keys, so
`ours.load_state_dict(theirs.state_dict())` works in both directions. `PolyChain` is the general layer for any
leading dims and `ProductChain` the PNN chain of the polynomial-network NTK papers.

Every module calls the fused ops `poly_chain` / `poly_ncp`; none re-implements the math. `backend` (None = auto,
"reference", "triton" or "cuda") is stored and passed to the op on every call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.poly_chain import poly_chain
from ..ops.poly_chain.common import ACTIVATIONS, MODES
from ..ops.poly_ncp import poly_ncp


def stack_linears(layers: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """weight [N, k, d] and bias [N, k] (None when the layers have none) of N nn.Linear layers of one shape.

    torch.stack is differentiable, so gradients reach each layer's own parameters; it copies N*k*(d+1) values,
    which is small next to the op itself (it reads the same weights)."""
    weight = torch.stack([layer.weight for layer in layers])
    bias = torch.stack([layer.bias for layer in layers]) if layers[0].bias is not None else None
    return weight, bias


class _SurveyImageClassifier(nn.Module):
    """The attributes the survey's Π-net classifiers share; subclasses add their layers in the survey's order."""

    def __init__(self, hidden_size, image_size, channels_in, n_degree, n_classes, backend):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("image_size", image_size), ("channels_in", channels_in),
                            ("n_degree", n_degree), ("n_classes", n_classes)):
            _checks.check_positive_int(name, value)
        self.image_size = image_size
        self.channels_in = channels_in
        self.total_image_size = image_size * image_size * channels_in
        self.hidden_size = hidden_size
        self.n_classes = n_classes
        self.n_degree = n_degree
        self.backend = backend


class CCP(_SurveyImageClassifier):
    """Π-net CCP classifier on flattened images, fused.

    h = z viewed as [B, channels_in * image_size**2];  y_1 = U_1 h,  y_n = (U_n h) * y_{n-1} + y_{n-1}
    for n = 2..n_degree;  returns fc_out(y_N) [B, n_classes]. Submodules `U1..U{n_degree}` (nn.Linear,
    d -> hidden_size, with bias when `bias`) and `fc_out` (hidden_size -> n_classes), as in the survey.
    `save_projections`: poly_chain's memory/compute trade (keep U_n h for the backward instead of recomputing it).
    """

    def __init__(self, hidden_size: int = 16, image_size: int = 28, channels_in: int = 1, n_degree: int = 4,
                 bias: bool = True, n_classes: int = 10, *, backend: str | None = None,
                 save_projections: bool = False):
        super().__init__(hidden_size, image_size, channels_in, n_degree, n_classes, backend)
        self.save_projections = save_projections
        for i in range(1, n_degree + 1):
            setattr(self, f"U{i}", nn.Linear(self.total_image_size, hidden_size, bias=bias))
        self.fc_out = nn.Linear(hidden_size, n_classes, bias=True)

    def chain_parameters(self) -> tuple[Tensor, Tensor | None]:
        """The arguments (weight [N, k, d], bias [N, k] | None) that forward passes to poly_chain."""
        return stack_linears([getattr(self, f"U{i}") for i in range(1, self.n_degree + 1)])

    def forward(self, z: Tensor) -> Tensor:
        h = z.reshape(-1, self.total_image_size)
        y = poly_chain(h, *self.chain_parameters(), mode="ccp", save_projections=self.save_projections,
                       backend=self.backend)
        return self.fc_out(y)


class NCP(_SurveyImageClassifier):
    """Π-net NCP classifier on flattened images, fused.

    h = z viewed as [B, channels_in * image_size**2];  y_1 = A_1 h,  y_n = (A_n h) * (S_n y_{n-1})
    for n = 2..n_degree;  returns fc_out(y_N) [B, n_classes]. Submodules `A1..A{n_degree}` (d -> hidden_size,
    with bias when `bias`), `S2..S{n_degree}` (hidden_size -> hidden_size, always with bias) and `fc_out`,
    registered in the survey's order (A1, A2, S2, A3, S3, ...), so one seed gives both the same initial weights.
    """

    def __init__(self, hidden_size: int = 16, image_size: int = 28, channels_in: int = 1, n_degree: int = 4,
                 bias: bool = True, n_classes: int = 10, *, backend: str | None = None):
        super().__init__(hidden_size, image_size, channels_in, n_degree, n_classes, backend)
        for i in range(1, n_degree + 1):
            setattr(self, f"A{i}", nn.Linear(self.total_image_size, hidden_size, bias=bias))
            if i > 1:
                setattr(self, f"S{i}", nn.Linear(hidden_size, hidden_size, bias=True))
        self.fc_out = nn.Linear(hidden_size, n_classes, bias=True)

    def chain_parameters(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """The arguments (a_weight [N, k, d], a_bias [N, k] | None, s_weight [N-1, k, k], s_bias [N-1, k]) that
        forward passes to poly_ncp; for N = 1 the S tensors are empty, (0, k, k) and (0, k)."""
        a_weight, a_bias = stack_linears([getattr(self, f"A{i}") for i in range(1, self.n_degree + 1)])
        if self.n_degree == 1:
            k = self.hidden_size
            return a_weight, a_bias, a_weight.new_empty(0, k, k), a_weight.new_empty(0, k)
        s_weight, s_bias = stack_linears([getattr(self, f"S{i}") for i in range(2, self.n_degree + 1)])
        return a_weight, a_bias, s_weight, s_bias

    def forward(self, z: Tensor) -> Tensor:
        h = z.reshape(-1, self.total_image_size)
        y = poly_ncp(h, *self.chain_parameters(), backend=self.backend)
        return self.fc_out(y)


class PolyChain(nn.Module):
    """Product-chain polynomial layer for inputs [..., in_features] -> [..., out_features], fused.

    u_n = scale * act(x @ weight[n].T + bias[n]);  mode="ccp": y_1 = u_1, y_n = u_n * y_{n-1} + y_{n-1};
    mode="product": y_n = u_n * y_{n-1}; returns y_N. Parameters `weight` [degree, out_features, in_features]
    and `bias` [degree, out_features] (None when bias=False), each projection initialised like nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, degree: int, mode: str = "ccp",
                 activation: str = "identity", bias: bool = True, scale: float = 1.0, *,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("degree", degree)):
            _checks.check_positive_int(name, value)
        _checks.check_choice("mode", mode, MODES)
        _checks.check_choice("activation", activation, ACTIVATIONS)
        self.in_features = in_features
        self.out_features = out_features
        self.degree = degree
        self.mode = mode
        self.activation = activation
        self.scale = _checks.check_finite_float("scale", scale)
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(degree, out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(degree, out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(d), 1/sqrt(d)), for weight and bias.
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return poly_chain(x, self.weight, self.bias, mode=self.mode, activation=self.activation, scale=self.scale,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, degree={self.degree}, "
                f"mode={self.mode!r}, activation={self.activation!r}, bias={self.bias is not None}, "
                f"scale={self.scale:g}, backend={self.backend!r}")


class ProductChain(PolyChain):
    """PNN product chain in the NTK parametrisation: y_1 = c relu(W_1 x), y_n = c relu(W_n x) * y_{n-1},
    c = sqrt(2 / out_features); W entries initialised N(0, 1) (bias, if any, zeros), as the polynomial-network
    NTK analyses do. That is PolyChain(mode="product", activation="relu", scale=c)."""

    def __init__(self, in_features: int, out_features: int, degree: int, bias: bool = False, *,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, degree, mode="product", activation="relu", bias=bias,
                         backend=backend, device=device, dtype=dtype)
        self.scale = math.sqrt(2 / out_features)  # out_features was validated above

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
