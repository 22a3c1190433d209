"""What the benchmarks measure, shared by the pytest-benchmark files and run.py.

- the plain-PyTorch formulas a user would write (the `eager` baseline; `compiled` is torch.compile of the same
  function), the one place they live;
- the cases, one class per family with one interface (`id`, `providers`, `describe()`, `flops(mode)`,
  `min_bytes(mode)`): `Case` (poly_chain, poly_ncp and the CCP / NCP modules: M rows, d inputs, k outputs, degree
  N), `LinearAttentionCase` (causal_linear_attention: B, T, H, Dk, Dv) and `PolySACase` (poly_sa: B, N, C);
- `make_workload`: a provider's forward on a case's inputs (same values for every provider), per family;
- the accuracy check against the float64 reference, and the timed steps (fwd, bwd, fwd+bwd).

Providers: eager, compiled, fla (flash-linear-attention's chunk_linear_attn, linear attention only; skipped when
it is not installed), triton, cuda (the last two are hadamard_kernels backends).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

import hadamard_kernels as hk

PROVIDERS = ("eager", "compiled", "fla", "triton", "cuda")
BASELINES = ("eager", "compiled", "fla")  # not ours: every row gets a speedup against each of them
MODES = ("fwd", "bwd", "fwd+bwd")
OPS = ("poly_chain", "poly_ncp", "CCP", "NCP", "linear_attention", "poly_sa")

# Relative error against the float64 reference above which a provider's result counts as wrong: the accuracy
# contract of DESIGN.md, except float32, which is allowed long fp32 reductions (M up to 16k rows in dweight) but
# still flags a TF32 dot (~1e-3).
WRONG_ABOVE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# ---------------------------------------------------------------- the eager formulas
_ACTIVATIONS = {"identity": lambda z: z, "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}


def poly_chain_eager(x: Tensor, weight: Tensor, bias: Tensor | None, mode: str = "ccp", activation: str = "identity",
                     scale: float = 1.0) -> Tensor:
    """poly_chain as a user writes it in PyTorch: one stacked matmul x @ weight.view(N*k, d).T, then the chain,
    all in the input dtype. x [..., d], weight [N, k, d], bias [N, k] | None -> [..., k]."""
    N, k, d = weight.shape
    z = F.linear(x, weight.reshape(N * k, d), None if bias is None else bias.reshape(N * k))
    u = scale * _ACTIVATIONS[activation](z.unflatten(-1, (N, k)))
    y = u[..., 0, :]
    for n in range(1, N):
        y = u[..., n, :] * y + y if mode == "ccp" else u[..., n, :] * y
    return y


def poly_ncp_eager(x: Tensor, a_weight: Tensor, a_bias: Tensor | None, s_weight: Tensor,
                   s_bias: Tensor | None) -> Tensor:
    """poly_ncp as a user writes it: one stacked matmul for A_1..A_N, then y_n = (A_n x + a_n) * (S_n y_{n-1} + s_n)."""
    N, k, d = a_weight.shape
    a = F.linear(x, a_weight.reshape(N * k, d), None if a_bias is None else a_bias.reshape(N * k)).unflatten(-1, (N, k))
    y = a[..., 0, :]
    for n in range(1, N):
        y = a[..., n, :] * F.linear(y, s_weight[n - 1], None if s_bias is None else s_bias[n - 1])
    return y


def survey_forward(model: torch.nn.Module, z: Tensor) -> Tensor:
    """The survey's forward (one nn.Linear call per degree) run on an hk.nn.CCP / NCP's own submodules: what the
    drop-in replaces."""
    h = z.reshape(-1, model.total_image_size)
    if isinstance(model, hk.nn.CCP):
        out = model.U1(h)
        for i in range(2, model.n_degree + 1):
            out = getattr(model, f"U{i}")(h) * out + out
    else:
        out = model.A1(h)
        for i in range(2, model.n_degree + 1):
            out = getattr(model, f"A{i}")(h) * getattr(model, f"S{i}")(out)
    return model.fc_out(out)


_FEATURE_MAPS = {"identity": lambda x: x, "elu1": lambda x: F.elu(x) + 1, "relu": F.relu}
CHUNK = 64  # tokens per chunk of the chunked eager form and of the FLOP model


def linear_attention_masked(q: Tensor, k: Tensor, v: Tensor, feature_map: str = "identity", normalize: bool = False,
                            scale: float = 1.0, eps: float = 1e-6) -> Tensor:
    """causal_linear_attention as the formula is written: ((phi(Q) phi(K)^T) ∘ M) V with M the causal mask, divided by
    the masked row sums + eps when normalize; the B x H x T x T scores in the input dtype.
    q, k [B, T, H, Dk], v [B, T, H, Dv] -> [B, T, H, Dv]."""
    phi = _FEATURE_MAPS[feature_map]
    scores = torch.einsum("bthk,bshk->bhts", phi(q), phi(k)).tril()
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    if normalize:
        o = o / (scores.sum(-1).transpose(1, 2)[..., None] + eps)
    return scale * o


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, feature_map: str = "identity", normalize: bool = False,
                             scale: float = 1.0, eps: float = 1e-6, chunk: int = CHUNK) -> Tensor:
    """The same function by chunks, as a user writes it in PyTorch when the T x T scores do not fit (no Python loop):
    the masked form inside each chunk, plus phi(Q_c) S_c with S_c = sum of phi(K)^T V over the earlier chunks (an
    exclusive cumsum of the per-chunk phi(K_c)^T V_c); the normalizer likewise with the key sums. Input dtype."""
    phi = _FEATURE_MAPS[feature_map]
    B, T, H, _ = q.shape
    n = -(-T // chunk)
    pad = (0, 0, 0, 0, 0, n * chunk - T)  # zero rows after phi: padded keys add nothing, padded queries are cut
    Q, K, V = (F.pad(t, pad).unflatten(1, (n, chunk)) for t in (phi(q), phi(k), v))  # [B, n, C, H, D]
    scores = torch.einsum("bnchk,bndhk->bnhcd", Q, K).tril()
    kv = torch.einsum("bnchk,bnchv->bnhkv", K, V)
    S = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1].cumsum(1)], 1)  # the state before each chunk
    o = torch.einsum("bnhcd,bndhv->bnchv", scores, V) + torch.einsum("bnchk,bnhkv->bnchv", Q, S)
    if normalize:
        k_sum = K.sum(2)  # [B, n, H, Dk]
        z = torch.cat([torch.zeros_like(k_sum[:, :1]), k_sum[:, :-1].cumsum(1)], 1)
        den = scores.sum(-1).transpose(2, 3) + torch.einsum("bnchk,bnhk->bnch", Q, z)
        o = o / (den[..., None] + eps)
    return scale * o.flatten(1, 2)[:, :T]


def poly_sa_eager(z: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Poly-SA as the survey's PolySA writes it (z @ W, the mean over the token dim), in the input dtype:
    z [B, N, C], w [C, C], alpha, beta [1] -> [B, N, C]."""
    m = torch.mean(torch.matmul(z, w1) * torch.matmul(z, w2), dim=1)
    return alpha * z + beta * torch.matmul(z * m.unsqueeze(1), w3)


class ProviderUnavailable(Exception):
    """A provider that cannot run a case here (e.g. flash-linear-attention not installed): the row is skipped with
    this message, not an error."""


def import_fla_chunk_linear_attn() -> Callable:
    """flash-linear-attention's chunk_linear_attn (package fla-core, or flash-linear-attention before the split)."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as exc:  # ImportError, or an install that fails at import (e.g. a missing dependency)
        raise ProviderUnavailable(
            f"flash-linear-attention is not installed ({type(exc).__name__}: {exc}); carry its wheels in .whl/ "
            "(benchmarks/README.md)") from exc
    return chunk_linear_attn


def fla_version() -> str | None:
    import importlib.metadata

    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def fla_forward(feature_map: str, normalize: bool, scale: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """What an fla user runs: the feature map in PyTorch (fla's layers do the same), then chunk_linear_attn on
    [B, T, H, D] (head_first=False where that flag exists). fla's normalize divides scale * phi(Q) S by
    scale * phi(q_t) . z_t + 1e-10, so the scale cancels: the same function as ours only at scale 1 (its 1e-10
    against our eps is below bf16 rounding for positive feature maps)."""
    chunk_linear_attn = import_fla_chunk_linear_attn()
    params = inspect.signature(chunk_linear_attn).parameters
    options = dict(scale=scale)
    if "normalize" in params:
        options["normalize"] = normalize  # its default is True
    elif normalize:
        raise ProviderUnavailable(f"{fla_version()}: chunk_linear_attn has no normalize option")
    if normalize and scale != 1.0:
        raise ProviderUnavailable(f"fla's normalize cancels scale; this case has scale {scale:g} (only scale 1 "
                                  "computes the same function)")
    if "head_first" in params:
        options["head_first"] = False  # [B, T, H, D]; older versions defaulted to [B, H, T, D]
    phi = _FEATURE_MAPS[feature_map]

    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return chunk_linear_attn(phi(q), phi(k), v, **options)[0]

    return forward


# ---------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark: op (poly_chain, poly_ncp, or the CCP / NCP module), a label, M rows (batch), d inputs,
    k outputs (hidden width), degree N, dtype and the chain's options."""

    op: str
    label: str
    M: int
    d: int
    k: int
    N: int
    dtype: torch.dtype = torch.bfloat16
    mode: str = "ccp"
    activation: str = "identity"
    bias: bool = True
    scale: float = 1.0
    channels: int = 1  # modules: images of `channels` x sqrt(d / channels)^2
    n_classes: int = 10

    providers: ClassVar[tuple[str, ...]] = ("eager", "compiled", "triton", "cuda")
    COUNTING: ClassVar[str] = ("poly_chain / poly_ncp / CCP / NCP: model FLOPs are the matmuls, forward 2·M·N·k·d "
                               "(+ 2·M·(N−1)·k² for NCP, + the classifier for the modules), backward 2× forward; "
                               "bytes are x, the weights and y once (backward: x, weights, dy, dx, dweight)")

    @property
    def id(self) -> str:
        return f"{self.op}-{self.label}-{DTYPE_NAMES[self.dtype]}"

    def __str__(self) -> str:
        return self.id

    @property
    def shape(self) -> str:
        return f"M={self.M} d={self.d} k={self.k} N={self.N}"

    @property
    def options(self) -> str:
        chain = self.op == "poly_chain"  # mode, activation and scale are poly_chain's options only
        options = [self.mode, self.activation] if chain else []
        options.append("bias" if self.bias else "no bias")
        if chain and self.scale != 1.0:
            options.append(f"scale {self.scale:.4g}")
        return ", ".join(options)

    def describe(self) -> dict:
        """JSON-ready description: shape, options, and the FLOP and byte counts the rates are computed from."""
        chain = self.op == "poly_chain"
        return dict(id=self.id, op=self.op, label=self.label, shape=self.shape, options=self.options,
                    M=self.M, d=self.d, k=self.k, N=self.N,
                    dtype=DTYPE_NAMES[self.dtype], bias=self.bias, mode=self.mode if chain else None,
                    activation=self.activation if chain else None, scale=self.scale if chain else None,
                    counting=self.COUNTING, **_counts(self))

    @property
    def image_size(self) -> int:
        side = math.isqrt(self.d // self.channels)
        if side * side * self.channels != self.d:
            raise ValueError(f"{self.id}: d={self.d} is not channels * side**2 with channels={self.channels}")
        return side

    def _weight_numel(self) -> int:
        n = self.N * self.k * (self.d + self.bias)
        if self.op in ("poly_ncp", "NCP"):
            n += (self.N - 1) * self.k * (self.k + 1)
        if self.op in ("CCP", "NCP"):
            n += self.n_classes * (self.k + 1)
        return n

    def flops(self, mode: str) -> int:
        """Model FLOPs: the matmuls, 2*M*N*k*d forward (+ the k x k products of NCP, + fc_out for the modules);
        the backward counts twice the forward (dx and dweight), so fwd+bwd is 3x and bwd 2x."""
        fwd = 2 * self.M * self.N * self.k * self.d
        if self.op in ("poly_ncp", "NCP"):
            fwd += 2 * self.M * (self.N - 1) * self.k * self.k
        if self.op in ("CCP", "NCP"):
            fwd += 2 * self.M * self.k * self.n_classes
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]

    def min_bytes(self, mode: str) -> int:
        """Compulsory traffic: forward reads x and the weights and writes y; backward reads x, the weights and dy
        and writes dx and dweight."""
        size = _itemsize(self.dtype)
        out = self.n_classes if self.op in ("CCP", "NCP") else self.k
        x, w, y = self.M * self.d, self._weight_numel(), self.M * out
        fwd, bwd = x + w + y, 2 * x + 2 * w + y
        return size * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# A T x T tensor of scores up to this size runs the masked form in the eager baseline; above it the chunked form.
# Its forward + backward holds about four of them (scores, the masked scores saved for the backward, their gradient
# and its masked copy), so 4 GiB keeps it well inside an 80 GB GPU next to the float64 reference.
MASKED_FORM_MAX_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class LinearAttentionCase:
    """One causal_linear_attention benchmark: q, k [B, T, H, Dk], v [B, T, H, Dv], dtype and options. `eager` picks
    the eager baseline's form: "masked", "chunked" or "auto" (masked when its T x T scores fit
    MASKED_FORM_MAX_BYTES)."""

    label: str
    B: int
    T: int
    H: int
    Dk: int
    Dv: int
    dtype: torch.dtype = torch.bfloat16
    feature_map: str = "identity"
    normalize: bool = False
    scale: float = 1.0
    eps: float = 1e-6
    eager: str = "auto"

    op: ClassVar[str] = "linear_attention"
    providers: ClassVar[tuple[str, ...]] = PROVIDERS
    COUNTING: ClassVar[str] = (
        f"linear_attention: model FLOPs are the matmuls of the chunked algorithm ({CHUNK}-token chunks C, full C×C "
        "score blocks, nothing recomputed), per token and head forward 2·C·(Dk+Dv') (intra-chunk scores and their "
        "product with V) + 4·Dk·Dv' (phi(Q)·S and the state update phi(K)ᵀV), Dv' = Dv + 1 with normalize "
        "(the key-sum column); backward 2× forward (dQ, dK, dV, dS). Bytes: q, k, v, o forward; q, k, v, o, do, dq, "
        "dk, dv forward+backward (each once: the byte floor)")

    @property
    def id(self) -> str:
        return f"{self.op}-{self.label}-{DTYPE_NAMES[self.dtype]}"

    def __str__(self) -> str:
        return self.id

    @property
    def shape(self) -> str:
        return f"B={self.B} T={self.T} H={self.H} Dk={self.Dk} Dv={self.Dv}"

    @property
    def scores_bytes(self) -> int:
        return self.B * self.H * self.T * self.T * _itemsize(self.dtype)

    @property
    def eager_form(self) -> str:
        if self.eager != "auto":
            return self.eager
        return "masked" if self.scores_bytes <= MASKED_FORM_MAX_BYTES else "chunked"

    @property
    def eager_description(self) -> str:
        gb = f"{self.scores_bytes / 1e9:.3g} GB"
        if self.eager_form == "masked":
            return f"masked form ((phi(Q) phi(K)^T) ∘ M) V, T x T scores {gb}"
        return f"chunked form ({CHUNK}-token chunks, cumsum of chunk states; the T x T scores would take {gb})"

    @property
    def options(self) -> str:
        options = [self.feature_map, f"normalize (eps {self.eps:g})" if self.normalize else "no normalize"]
        if self.scale != 1.0:
            options.append(f"scale {self.scale:.4g}")
        return ", ".join(options)

    def describe(self) -> dict:
        return dict(id=self.id, op=self.op, label=self.label, shape=self.shape, options=self.options, B=self.B,
                    T=self.T, H=self.H, Dk=self.Dk, Dv=self.Dv, dtype=DTYPE_NAMES[self.dtype],
                    feature_map=self.feature_map, normalize=self.normalize, scale=self.scale, eps=self.eps,
                    eager=self.eager_description, counting=self.COUNTING, **_counts(self))

    def flops(self, mode: str) -> int:
        value_dim = self.Dv + self.normalize
        fwd = self.B * self.T * self.H * (2 * CHUNK * (self.Dk + value_dim) + 4 * self.Dk * value_dim)
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]

    def min_bytes(self, mode: str) -> int:
        """fwd: read q, k, v, write o; bwd: read q, k, v, do, write dq, dk, dv; fwd+bwd: q, k, v, o, do, dq, dk, dv
        once each (a fused forward + backward need not read q, k, v twice)."""
        qk, v = self.B * self.T * self.H * self.Dk, self.B * self.T * self.H * self.Dv
        n = {"fwd": 2 * qk + 2 * v, "bwd": 4 * qk + 3 * v, "fwd+bwd": 4 * qk + 4 * v}[mode]
        return _itemsize(self.dtype) * n


@dataclasses.dataclass(frozen=True)
class PolySACase:
    """One poly_sa benchmark (the PolySA module's op, no mask): z [B, N, C], w1, w2, w3 [C, C], dtype."""

    label: str
    B: int
    N: int
    C: int
    dtype: torch.dtype = torch.bfloat16

    op: ClassVar[str] = "poly_sa"
    providers: ClassVar[tuple[str, ...]] = ("eager", "compiled", "triton", "cuda")
    COUNTING: ClassVar[str] = ("poly_sa: model FLOPs are the three B·N×C×C matmuls, forward 6·B·N·C², backward 2× "
                               "forward (the fused backward recomputes the pool and the projections, not counted); "
                               "bytes: z, the weights and Y forward; z, the weights, dY, dz and the weight gradients "
                               "backward")

    @property
    def id(self) -> str:
        return f"{self.op}-{self.label}-{DTYPE_NAMES[self.dtype]}"

    def __str__(self) -> str:
        return self.id

    @property
    def shape(self) -> str:
        return f"B={self.B} N={self.N} C={self.C}"

    @property
    def options(self) -> str:
        return "no mask"

    def describe(self) -> dict:
        return dict(id=self.id, op=self.op, label=self.label, shape=self.shape, options=self.options, B=self.B,
                    N=self.N, C=self.C, dtype=DTYPE_NAMES[self.dtype], counting=self.COUNTING, **_counts(self))

    def flops(self, mode: str) -> int:
        fwd = 6 * self.B * self.N * self.C * self.C
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]

    def min_bytes(self, mode: str) -> int:
        """fwd: read z and the weights, write Y; bwd: read z, the weights and dY, write dz and the weight gradients;
        fwd+bwd: both."""
        z, w = self.B * self.N * self.C, 3 * self.C * self.C + 2
        fwd, bwd = 2 * z + w, 3 * z + 2 * w
        return _itemsize(self.dtype) * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


AnyCase = Case | LinearAttentionCase | PolySACase


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _counts(case: AnyCase) -> dict:
    return dict(flops_fwd=case.flops("fwd"), flops_fwd_bwd=case.flops("fwd+bwd"), bytes_fwd=case.min_bytes("fwd"),
                bytes_fwd_bwd=case.min_bytes("fwd+bwd"))


def poly_chain_cases(quick: bool = False) -> list[Case]:
    """Π-net CCP layers on images (MNIST 784 / CIFAR 3072 inputs), a PNN (NTK) chain, and transformer-MLP-like
    gates (16k tokens, d = k = 1024). The quick set comes first."""
    quick_cases = [
        Case("poly_chain", "pinet-mnist", M=4096, d=784, k=64, N=4),
        Case("poly_chain", "mlp-ccp3", M=16384, d=1024, k=1024, N=3),
        Case("poly_chain", "pinet-mnist", M=4096, d=784, k=64, N=4, dtype=torch.float32),
    ]
    if quick:
        return quick_cases
    return quick_cases + [
        Case("poly_chain", "pinet-small", M=1024, d=784, k=16, N=2),  # the survey's width: launch-bound
        Case("poly_chain", "pinet-cifar", M=8192, d=3072, k=256, N=8),
        # scale sqrt(2) with unit-variance pre-activations keeps E[u^2] = 1, so the product stays O(1).
        Case("poly_chain", "pnn-relu", M=8192, d=1024, k=512, N=4, mode="product", activation="relu", bias=False,
             scale=math.sqrt(2)),
        Case("poly_chain", "mlp-bilinear", M=16384, d=1024, k=1024, N=2, mode="product"),
        Case("poly_chain", "mlp-ccp3", M=16384, d=1024, k=1024, N=3, dtype=torch.float32),
    ]


def poly_ncp_cases(quick: bool = False) -> list[Case]:
    quick_cases = [Case("poly_ncp", "mnist", M=4096, d=784, k=64, N=4)]
    if quick:
        return quick_cases
    return quick_cases + [
        Case("poly_ncp", "cifar", M=8192, d=3072, k=256, N=4),
        Case("poly_ncp", "wide", M=16384, d=1024, k=256, N=3),
        Case("poly_ncp", "mnist", M=4096, d=784, k=64, N=4, dtype=torch.float32),
    ]


def module_cases(quick: bool = False) -> list[Case]:
    """hk.nn.CCP / NCP against the survey's forward on the same weights: MNIST batch of 4096, hidden 128."""
    quick_cases = [Case("CCP", "mnist", M=4096, d=784, k=128, N=4)]
    if quick:
        return quick_cases
    return quick_cases + [
        Case("NCP", "mnist", M=4096, d=784, k=128, N=4),
        Case("CCP", "cifar", M=2048, d=3072, k=256, N=6, channels=3),
    ]


def linear_attention_cases(quick: bool = False) -> list[LinearAttentionCase]:
    """The published flash-linear-attention shapes B·T·H·D (Dk = Dv = D), bf16: identity feature map with scale
    D^-1/2, then each with the elu(x) + 1 feature map and normalize=True at scale 1 (the linear transformer's
    normalized form; with an identity map the normalizer can cross zero). The quick set is the smallest shape."""
    shapes = [(8, 1024, 8, 64), (1, 8192, 96, 128), (8, 2048, 32, 256)]
    plain = [LinearAttentionCase(f"{B}x{T}x{H}x{D}", B=B, T=T, H=H, Dk=D, Dv=D, scale=D ** -0.5)
             for B, T, H, D in shapes]
    if quick:
        return plain[:1]
    return plain + [LinearAttentionCase(f"{B}x{T}x{H}x{D}-elu1-norm", B=B, T=T, H=H, Dk=D, Dv=D, feature_map="elu1",
                                        normalize=True) for B, T, H, D in shapes]


def poly_sa_cases(quick: bool = False) -> list[PolySACase]:
    """ViT-like token mixers (the issue's shapes): ViT-S/16 at 224 px (197 tokens, C = 384), a stage-1 pyramid
    transformer at 224 px (56 x 56 = 3136 tokens, C = 96) and a long sequence (16k tokens, C = 512), bf16; the quick
    set is the first."""
    quick_cases = [PolySACase("vit-s16", B=64, N=197, C=384)]
    if quick:
        return quick_cases
    return quick_cases + [
        PolySACase("stage1-3136", B=32, N=3136, C=96),
        PolySACase("long-16k", B=8, N=16384, C=512),
        PolySACase("vit-s16", B=64, N=197, C=384, dtype=torch.float32),
    ]


def all_cases(quick: bool = False) -> list[AnyCase]:
    """Every case: the quick ones first, then the rest, each part taking the families in turn, so a run cut short by
    a time budget has covered every family."""
    families = [poly_chain_cases, linear_attention_cases, poly_ncp_cases, module_cases, poly_sa_cases]
    first = _interleave([f(quick=True) for f in families])
    if quick:
        return first
    return first + _interleave([[c for c in f() if c not in first] for f in families])


def _interleave(lists: list[list]) -> list:
    return [items[i] for i in range(max(map(len, lists))) for items in lists if i < len(items)]


# ---------------------------------------------------------------- workloads
@dataclasses.dataclass
class Workload:
    """A provider's forward on one case's inputs: `forward()` returns the output; `leaves` are the tensors whose
    gradients a backward of `grad_out` fills (inputs, then weights)."""

    forward: Callable[[], Tensor]
    leaves: list[Tensor]
    grad_out: Tensor


def _randn(g: torch.Generator, shape, std: float, device, dtype) -> Tensor:
    # Drawn in float32 and rounded to the case dtype first, so every provider and the float64 reference see the
    # same values.
    return (torch.randn(shape, generator=g, device=device) * std).to(dtype)


def make_workload(case: AnyCase, provider: str, device="cuda", dtype: torch.dtype | None = None) -> Workload:
    """`provider` in case.providers, or "reference" (with dtype=torch.float64 for the oracle). `dtype` overrides the
    compute dtype; the values are always those of the case dtype. Raises ProviderUnavailable for a provider that
    cannot run here (fla not installed, or an option it lacks)."""
    if provider not in (*case.providers, "reference"):
        raise ValueError(f"provider must be one of {case.providers} or 'reference' for {case}, got {provider!r}")
    dtype = dtype or case.dtype
    if isinstance(case, LinearAttentionCase):
        return _linear_attention_workload(case, provider, device, dtype)
    if isinstance(case, PolySACase):
        return _poly_sa_workload(case, provider, device, dtype)
    return _poly_workload(case, provider, device, dtype)


def _poly_sa_workload(case: PolySACase, provider: str, device, dtype: torch.dtype) -> Workload:
    g = torch.Generator(device=device).manual_seed(0)
    # The survey's initialisation: weights randn / sqrt(C), alpha and beta randn.
    shapes_stds = [((case.B, case.N, case.C), 1.0), *[((case.C, case.C), case.C ** -0.5)] * 3, ((1,), 1.0),
                   ((1,), 1.0)]
    inputs = [_randn(g, shape, std, device, case.dtype).to(dtype).requires_grad_() for shape, std in shapes_stds]
    grad_out = _randn(g, (case.B, case.N, case.C), 1.0, device, case.dtype).to(dtype)
    if provider in BASELINES:
        fn = _baseline(poly_sa_eager, provider)
    else:
        fn = functools.partial(hk.poly_sa, backend=provider)
    return Workload(functools.partial(fn, *inputs), inputs, grad_out)


def _linear_attention_workload(case: LinearAttentionCase, provider: str, device, dtype: torch.dtype) -> Workload:
    g = torch.Generator(device=device).manual_seed(0)
    qk_shape, v_shape = (case.B, case.T, case.H, case.Dk), (case.B, case.T, case.H, case.Dv)
    inputs = [_randn(g, shape, 1.0, device, case.dtype).to(dtype).requires_grad_()
              for shape in (qk_shape, qk_shape, v_shape)]
    grad_out = _randn(g, v_shape, 1.0, device, case.dtype).to(dtype)
    if provider == "fla":
        fn = fla_forward(case.feature_map, case.normalize, case.scale)
    else:
        options = dict(feature_map=case.feature_map, normalize=case.normalize, scale=case.scale, eps=case.eps)
        if provider in BASELINES:
            eager = linear_attention_masked if case.eager_form == "masked" else linear_attention_chunked
            fn = _baseline(functools.partial(eager, **options), provider)
        else:
            fn = functools.partial(hk.causal_linear_attention, **options, backend=provider)
    return Workload(functools.partial(fn, *inputs), inputs, grad_out)


def _poly_workload(case: Case, provider: str, device, dtype: torch.dtype) -> Workload:
    g = torch.Generator(device=device).manual_seed(0)
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    if case.op in ("CCP", "NCP"):
        torch.manual_seed(0)
        cls = hk.nn.CCP if case.op == "CCP" else hk.nn.NCP
        model = cls(hidden_size=case.k, image_size=case.image_size, channels_in=case.channels, n_degree=case.N,
                    bias=case.bias, n_classes=case.n_classes,
                    backend=None if provider in BASELINES else provider)
        model = model.to(device=device, dtype=case.dtype).to(dtype)  # the case dtype's values, like the inputs
        x = cast(_randn(g, (case.M, case.channels, case.image_size, case.image_size), 1.0, device, case.dtype))
        fn = _baseline(functools.partial(survey_forward, model), provider) if provider in BASELINES else model
        leaves = [x, *model.parameters()]
        forward = functools.partial(fn, x)
        out_features = case.n_classes
    else:
        x = _randn(g, (case.M, case.d), 1.0, device, case.dtype)
        weight = _randn(g, (case.N, case.k, case.d), case.d ** -0.5, device, case.dtype)
        bias = _randn(g, (case.N, case.k), 0.1, device, case.dtype) if case.bias else None
        if case.op == "poly_chain":
            inputs = [cast(t) for t in (x, weight, bias)]
            options = dict(mode=case.mode, activation=case.activation, scale=case.scale)
            eager, fused = poly_chain_eager, hk.poly_chain
        else:
            s_weight = _randn(g, (case.N - 1, case.k, case.k), case.k ** -0.5, device, case.dtype)
            s_bias = _randn(g, (case.N - 1, case.k), 0.1, device, case.dtype) if case.bias else None
            inputs = [cast(t) for t in (x, weight, bias, s_weight, s_bias)]
            options = {}
            eager, fused = poly_ncp_eager, hk.poly_ncp
        if provider in BASELINES:
            fn = _baseline(functools.partial(eager, **options), provider)
        else:
            fn = functools.partial(fused, **options, backend=provider)
        leaves = [t for t in inputs if t is not None]
        forward = functools.partial(fn, *inputs)
        out_features = case.k
    grad_out = _randn(g, (case.M, out_features), 1.0, device, case.dtype).to(dtype)
    return Workload(forward, leaves, grad_out)


def _baseline(fn: Callable, provider: str) -> Callable:
    if provider == "eager":
        return fn
    # A fresh Dynamo cache per workload: cases would otherwise pile up recompilations of the same function until
    # Dynamo's recompile limit silently falls back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------- accuracy
def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or inf the reference does not."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return math.inf
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def forward_backward(work: Workload) -> tuple[Tensor, list[Tensor]]:
    """Output and leaf gradients of one forward + backward of `grad_out`."""
    for t in work.leaves:
        t.grad = None
    y = work.forward()
    y.backward(work.grad_out)
    return y.detach(), [t.grad for t in work.leaves]


@functools.lru_cache(maxsize=1)
def reference_result(case: AnyCase, device="cuda") -> tuple[Tensor, list[Tensor]]:
    """The float64 oracle (the reference backend on float64 copies of the inputs)."""
    return forward_backward(make_workload(case, "reference", device, dtype=torch.float64))


def check_accuracy(case: AnyCase, work: Workload, device="cuda") -> dict:
    """Relative errors of the output (fwd) and of the worst leaf gradient (bwd) against the float64 reference,
    and whether they are within WRONG_ABOVE. Runs one forward + backward (which also warms the provider up)."""
    ref_y, ref_grads = reference_result(case, device)
    y, grads = forward_backward(work)
    err_fwd = rel_err(y, ref_y)
    err_bwd = max(rel_err(g, ref_g) if g is not None else math.inf for g, ref_g in zip(grads, ref_grads))
    tol = WRONG_ABOVE[case.dtype]
    return dict(rel_err_fwd=err_fwd, rel_err_bwd=err_bwd, tolerance=tol, accurate=max(err_fwd, err_bwd) <= tol)


# ---------------------------------------------------------------- timed steps
def make_step(work: Workload, mode: str) -> Callable[[], None]:
    """The callable a timer repeats (no synchronization inside: a wall-clock timer adds its own).
    fwd: inference forward (no autograd graph); bwd: the backward of one retained forward graph; fwd+bwd: both."""
    leaves = work.leaves

    def clear_grads():
        for t in leaves:
            t.grad = None

    if mode == "fwd":
        def step():
            with torch.no_grad():
                work.forward()
    elif mode == "bwd":
        y = work.forward()

        def step():
            clear_grads()
            y.backward(work.grad_out, retain_graph=True)
    elif mode == "fwd+bwd":
        def step():
            clear_grads()
            work.forward().backward(work.grad_out)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return step


def compiled_for_mode(mode: str):
    """The context a `mode` workload is made and timed in. torch.compile donates the buffers a compiled backward
    saved, and such a backward refuses retain_graph=True, which the bwd step needs (it replays one graph's backward):
    for bwd, compile without donation."""
    from torch._functorch import config as functorch_config

    if mode == "bwd" and hasattr(functorch_config, "donated_buffer"):
        return functorch_config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def peak_mib(step: Callable[[], None]) -> float:
    """Device memory one call of `step` allocates beyond what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def rates(case: AnyCase, mode: str, ms: float) -> dict:
    """TFLOP/s (model FLOPs) and GB/s (compulsory bytes) of `case` in `mode` run in `ms` milliseconds."""
    return dict(tflops=case.flops(mode) / ms / 1e9, gbps=case.min_bytes(mode) / ms / 1e6)


# ---------------------------------------------------------------- pytest-benchmark
def run_pytest_benchmark(benchmark, case: AnyCase, provider: str, mode: str, rounds: int = 20,
                         warmup_rounds: int = 3) -> None:
    """One pytest-benchmark measurement: check accuracy once, warm up (autotune, compile), then time `mode` with
    a synchronization inside the timed callable; GB/s, TFLOP/s, errors and peak memory go to extra_info."""
    import pytest

    if provider not in BASELINES and (why := hk.available_backends("cuda", case.dtype)[provider]) is not None:
        pytest.skip(f"backend {provider} is not available: {why}")
    with compiled_for_mode(mode):
        try:
            work = make_workload(case, provider)
        except ProviderUnavailable as exc:
            pytest.skip(str(exc))
        accuracy = check_accuracy(case, work)
        benchmark.extra_info.update(case=case.describe(), provider=provider, mode=mode, **accuracy)
        if not accuracy["accurate"]:
            pytest.fail(f"{provider} on {case}: relative error fwd {accuracy['rel_err_fwd']:.2e}, "
                        f"bwd {accuracy['rel_err_bwd']:.2e} > {accuracy['tolerance']:.0e}; not timed")
        step = make_step(work, mode)
        step()
        benchmark.extra_info["peak_mib"] = peak_mib(step)

        def timed():
            step()
            torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info.update(rates(case, mode, benchmark.stats.stats.median * 1e3))
