"""MONet's polynomial modules (the Hadamard-product survey's PolyMlp and PolyBlock, arXiv 2504.13112 §S.2).

`PolyMlp` and `PolyBlock` take the survey's constructor arguments and have its submodules and parameters
(`U1, U2, U3, C, norm1, norm3, alpha`; `norm, mlp1, mlp2`), registered in the same order and initialised the same
way (kaiming-normal U1..U3 weights, their biases set to one, alpha = 1), so `load_state_dict` works in both
directions and one seed gives both the same weights. The part between the linear layers, two LayerNorms, the
Hadamard product and the residual (and the shift of U1 x), runs in the fused op `poly_gate`.

Differences from the survey's code, on purpose:
- its `Spatial_Shift` assigns overlapping slices in place (`x[:, 1:, :, :c//4] = x[:, :w-1, :, :c//4]`), which in
  PyTorch is not a shift (on CPU it copies the first row along the whole axis) and depends on the device; ours is
  the intended shift (each channel group moved by exactly one pixel, the border row kept, `hk.spatial_shift`);
- `bias=False` gives U1..U3 no biases (MONet's timm code passes `to_2tuple(bias)`, a non-empty tuple, to
  nn.Linear, so its U layers always have one);
- `hidden_features=None` means `in_features` for every layer (the survey's code then builds U1 with None).
As in the survey, `drop` makes a `drop2` dropout module that forward does not apply, `n_degree` is stored and not
used (the block is second degree), and `use_conv=True` (1x1 convolutions, channels first) is not supported here:
its LayerNorms would normalise the last spatial axis instead of the channels.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.poly_gate import poly_gate, spatial_shift


class SpatialShift(nn.Module):
    """x [B, W, H, C] -> the channel groups [0, C//4), [C//4, C//2), [C//2, 3C//4), [3C//4, C) shifted by one pixel
    along +W, -W, +H, -H, out of place, the border row kept (`hk.spatial_shift`). No parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return spatial_shift(x)


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes whole samples with probability `drop_prob` and scales the others by
    1 / (1 - drop_prob); the identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _layer_norm_parameters(norm: nn.Module, name: str, features: int):
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (features,):
        raise ValueError(f"norm_layer must build an nn.LayerNorm over the last dim ({features} features) for {name}, "
                         f"got {norm!r}")


class PolyMlp(nn.Module):
    """MONet's second-degree polynomial MLP, fused.

    out1 = U1 x (hidden), out2 = U3(U2 x) (U2: in -> hidden // 8, U3: hidden // 8 -> hidden); with use_spatial,
    x is [B, W, H, in_features] and both U1 x and U2 x are spatially shifted. Returns
    C(norm1(out1) + alpha * norm1(out1) * norm3(out2)) (alpha = 1 without use_alpha); the gate is one `poly_gate`
    call (the shift of U1 x fused into it). `backend` (None = auto, "reference", "triton" or "cuda") is passed to
    the op on every call.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = True, drop: float = 0.0, use_conv: bool = False, n_degree: int = 2,
                 use_alpha: bool = True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_spatial: bool = False, *,
                 backend: str | None = None):
        super().__init__()
        _checks.check_positive_int("in_features", in_features)
        for name, value in (("hidden_features", hidden_features), ("out_features", out_features)):
            if value is not None:
                _checks.check_positive_int(name, value)
        if use_conv:
            raise NotImplementedError("PolyMlp(use_conv=True) is not supported: the survey's LayerNorms would "
                                      "normalise the last spatial axis of a channels-first tensor")
        self.in_features = in_features
        self.out_features = out_features or in_features
        self.hidden_features = hidden_features or in_features
        if self.hidden_features < 8:
            raise ValueError(f"hidden_features must be >= 8 (U2 has hidden_features // 8 outputs), got "
                             f"{self.hidden_features}")
        self.use_alpha = use_alpha
        self.use_spatial = use_spatial
        self.backend = backend
        # The survey's order: norms, U1, U2, U3, C (default nn.Linear init draws from the RNG), then init_weights.
        self.norm1 = norm_layer(self.hidden_features)
        self.norm3 = norm_layer(self.hidden_features)
        _layer_norm_parameters(self.norm1, "norm1", self.hidden_features)
        _layer_norm_parameters(self.norm3, "norm3", self.hidden_features)
        if self.norm1.eps != self.norm3.eps:
            raise ValueError(f"norm1 and norm3 must share eps, got {self.norm1.eps} and {self.norm3.eps}")
        self.n_degree = n_degree
        self.U1 = nn.Linear(self.in_features, self.hidden_features, bias=bias)
        self.U2 = nn.Linear(self.in_features, self.hidden_features // 8, bias=bias)
        self.U3 = nn.Linear(self.hidden_features // 8, self.hidden_features, bias=bias)
        self.C = nn.Linear(self.hidden_features, self.out_features, bias=True)
        self.drop2 = nn.Dropout(drop)  # made as in the survey, which never applies it
        if use_spatial:
            self.spatial_shift = SpatialShift()
        if use_alpha:
            self.alpha = nn.Parameter(torch.ones(1))
        self.init_weights()

    def init_weights(self) -> None:
        for layer in (self.U1, self.U2, self.U3):
            nn.init.kaiming_normal_(layer.weight)
        for layer in (self.U1, self.U2, self.U3):
            if layer.bias is not None:
                nn.init.ones_(layer.bias)

    @staticmethod
    def _affine(norm: nn.LayerNorm, like: Tensor) -> tuple[Tensor, Tensor]:
        """weight and bias of a LayerNorm, ones and zeros where it has none (elementwise_affine=False, bias=False)."""
        weight = norm.weight if norm.weight is not None else like.new_ones(norm.normalized_shape)
        bias = norm.bias if norm.bias is not None else like.new_zeros(norm.normalized_shape)
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.U1(x)
        out2 = self.U2(x)
        if self.use_spatial:
            out2 = self.spatial_shift(out2)  # out1's shift is fused into poly_gate
        out2 = self.U3(out2)
        y = poly_gate(out1, out2, *self._affine(self.norm1, out1), *self._affine(self.norm3, out1),
                      self.alpha if self.use_alpha else None, eps=self.norm1.eps, spatial_shift=self.use_spatial,
                      backend=self.backend)
        return self.C(y)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.out_features}, use_alpha={self.use_alpha}, use_spatial={self.use_spatial}, "
                f"backend={self.backend!r}")


class PolyBlock(nn.Module):
    """MONet's block on channels-last images x [B, W, H, embed_dim]:
    x = x + drop_path(mlp1(norm(x))), then x = x + drop_path(mlp2(norm(x))), with one shared LayerNorm `norm`,
    mlp1 = PolyMlp(embed_dim, embed_dim, embed_dim, use_spatial=True) and
    mlp2 = PolyMlp(embed_dim, embed_dim * expansion_factor, embed_dim) (both with the survey's default norms)."""

    def __init__(self, embed_dim: int, expansion_factor: int = 3, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 drop: float = 0.0, drop_path: float = 0.0, n_degree: int = 2, *, backend: str | None = None):
        super().__init__()
        _checks.check_positive_int("embed_dim", embed_dim)
        _checks.check_positive_int("expansion_factor", expansion_factor)
        self.embed_dim = embed_dim
        self.expansion_factor = expansion_factor
        self.norm = norm_layer(embed_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp1 = PolyMlp(embed_dim, embed_dim, embed_dim, drop=drop, n_degree=n_degree, use_spatial=True,
                            backend=backend)
        self.mlp2 = PolyMlp(embed_dim, embed_dim * expansion_factor, embed_dim, drop=drop, n_degree=n_degree,
                            use_spatial=False, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mlp1(self.norm(x)))
        return x + self.drop_path(self.mlp2(self.norm(x)))
