"""What the benchmarks measure, shared by the pytest-benchmark suite (bench_*.py, suite.py) and the report.

- the plain-PyTorch formulas a user would write (the `eager` baseline; `compiled` and `max-autotune` are
  torch.compile of the same function), the one place they live;
- the cases, one class per family with one interface (`id`, `providers`, `runs(device)`, `describe()`,
  `flops(mode)`, `min_bytes(mode)`): `Case` (poly_chain, poly_ncp and the CCP / NCP modules: M rows, d inputs,
  k outputs, degree N), `LinearAttentionCase` (causal_linear_attention: B, T, H, Dk, Dv), `PolySACase` (poly_sa: B,
  N, C), `PolyGateCase` (poly_gate: B, W, H, C) and `LRNNCase` (lrnn_product and the deep LRNN module);
- the case lists: the GPU cases (model shapes, then one size sweep per family), the quick subset, and the tiny CPU
  cases (the pipeline check a CPU machine runs);
- `make_workload`: a provider's forward on a case's inputs (same values for every provider), per family;
- the accuracy check against the float64 reference, and the timed steps (fwd, bwd, fwd+bwd).

Providers: eager, compiled (torch.compile, default mode), max-autotune (torch.compile(mode="max-autotune"), on the
cases marked for it), fla (flash-linear-attention's chunk_linear_attn, linear attention only; skipped when it is not
installed), triton, cuda, cuda-wgmma (poly_chain's cuda backend with its opt-in Hopper forward,
HADAMARD_KERNELS_CUDA_WGMMA=1 around each call; sm_90 GPUs, fp16/bf16), and on a CPU reference (triton, cuda,
cuda-wgmma and reference are hadamard_kernels backends).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

import hadamard_kernels as hk

PROVIDERS = ("eager", "compiled", "max-autotune", "fla", "triton", "cuda", "cuda-wgmma", "reference")
BASELINES = ("eager", "compiled", "max-autotune", "fla")  # not ours: every row gets a speedup against each of them
CPU_PROVIDERS = ("eager", "reference", "triton")  # a CPU run: the reference, the Triton interpreter, eager
# fwd: inference forward; bwd: the backward of one retained graph; fwd+bwd: both; fwd+bwd-graph: fwd+bwd replayed
# from a CUDA graph (the difference to fwd+bwd is the per-call launch and dispatch cost).
MODES = ("fwd", "bwd", "fwd+bwd", "fwd+bwd-graph")
WGMMA = "cuda-wgmma"


def backend_of(provider: str) -> str | None:
    """The hadamard_kernels backend a provider runs (None for the baselines)."""
    return None if provider in BASELINES else "cuda" if provider == WGMMA else provider
OPS = ("poly_chain", "poly_ncp", "CCP", "NCP", "linear_attention", "poly_sa", "poly_gate", "lrnn", "LRNN")

# Relative error against the float64 reference above which a provider's result counts as wrong: the accuracy
# contract of DESIGN.md, except float32, which is allowed long fp32 reductions (M up to 64k rows in dweight) but
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


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, key_sum: Tensor | None = None,
                          feature_map: str = "identity", normalize: bool = False, scale: float = 1.0,
                          eps: float = 1e-6) -> Tensor:
    """One decoding step as a user writes it in PyTorch: q, k [B, 1, H, Dk], v [B, 1, H, Dv], the state [B, H, Dk, Dv]
    (and key sum [B, H, Dk]) in float32 -> o [B, 1, H, Dv] from S + phi(k)^T v (the new state, not returned here;
    computed as a decoder must)."""
    phi_q, phi_k = (_FEATURE_MAPS[feature_map](t[:, 0]).float() for t in (q, k))  # [B, H, Dk]
    S = state + phi_k[..., None] * v[:, 0, :, None, :].float()
    o = torch.einsum("bhk,bhkv->bhv", phi_q, S)
    if normalize:
        o = o / (torch.einsum("bhk,bhk->bh", phi_q, key_sum + phi_k)[..., None] + eps)
    return (scale * o).to(q.dtype)[:, None]


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


def spatial_shift_eager(x: Tensor) -> Tensor:
    """MONet's spatial shift as a user writes it out of place (DESIGN.md §5): the channel groups [0, C//4),
    [C//4, C//2), [C//2, 3C//4), [3C//4, C) of x [B, W, H, C] moved one pixel along +W, -W, +H, -H, the border row
    kept, by concatenating slices."""
    g1, g2, g3 = x.shape[-1] // 4, x.shape[-1] // 2, 3 * x.shape[-1] // 4
    return torch.cat([torch.cat([x[:, :1, :, :g1], x[:, :-1, :, :g1]], 1),
                      torch.cat([x[:, 1:, :, g1:g2], x[:, -1:, :, g1:g2]], 1),
                      torch.cat([x[:, :, :1, g2:g3], x[:, :, :-1, g2:g3]], 2),
                      torch.cat([x[:, :, 1:, g3:], x[:, :, -1:, g3:]], 2)], -1)


def poly_gate_eager(a: Tensor, b: Tensor, ln1_weight: Tensor, ln1_bias: Tensor, ln2_weight: Tensor, ln2_bias: Tensor,
                    alpha: Tensor | None, eps: float = 1e-6, spatial_shift: bool = False) -> Tensor:
    """The part of MONet's PolyMlp between its linear layers, as the survey writes it (with the intended shift):
    n1 = LN1(shift(a) or a), n2 = LN2(b), n1 + alpha * n1 * n2, in the input dtype. a, b [..., C]."""
    if spatial_shift:
        a = spatial_shift_eager(a)
    C = a.shape[-1]
    n1 = F.layer_norm(a, (C,), ln1_weight, ln1_bias, eps)
    n2 = F.layer_norm(b, (C,), ln2_weight, ln2_bias, eps)
    return n1 + (1.0 if alpha is None else alpha) * n1 * n2


_LRNN_G = {"sin": None, "spder": lambda z: torch.sin(z) * torch.sqrt(torch.abs(z)), "arctan": torch.atan,
           "tanh": torch.tanh}


def lrnn_product_eager(x: Tensor, weight: Tensor, bias: Tensor | None, rank: int, dbar: int,
                       activation: str = "sin", omega: float = 1.0, gamma: float | None = None,
                       g_params: Tensor | None = None) -> Tensor:
    """lrnn_product as DESIGN.md §4 writes it, in the input dtype: z = x W^T + b viewed [..., rank, dbar],
    phi_l = prod_j (1 + gamma g(z_lj)), gamma = dbar^-1/2 by default; g(z) = sin(omega z), sin(z) sqrt|z|,
    atan, tanh, or the per-component network sum_i a_lji tanh(w_lji z + c_lji) (g_params = stack([a, w, c]))."""
    z = F.linear(x, weight, bias).unflatten(-1, (rank, dbar))
    if activation == "mlp":
        a, w, c = g_params
        g = (a * torch.tanh(w * z.unsqueeze(-1) + c)).sum(-1)
    elif activation == "sin":
        g = torch.sin(omega * z)
    else:
        g = _LRNN_G[activation](z)
    return torch.prod(1 + (dbar ** -0.5 if gamma is None else gamma) * g, dim=-1)


def lrnn_deep_eager(model: torch.nn.Module, x: Tensor) -> Tensor:
    """A deep LRNN as a user writes it, on an hk.nn.LRNN's own parameters: each layer's product activation by the
    formula above, its LayerNorm, then S_out."""
    for layer, norm in zip(model.layers, model.norms):
        x = norm(lrnn_product_eager(x, layer.weight, layer.bias, layer.rank, layer.dbar, layer.activation,
                                    layer.omega, layer.gamma, layer.g_params))
    return model.S_out(x)


class ProviderUnavailable(Exception):
    """A provider that cannot run a case here (e.g. flash-linear-attention not installed): the row is skipped with
    this message, not an error."""


def _import_fla_linear_attn(name: str) -> Callable:
    """fla.ops.linear_attn.<name> (package fla-core, or flash-linear-attention before the split)."""
    try:
        import fla.ops.linear_attn as module
    except Exception as exc:  # ImportError, or an install that fails at import (e.g. a missing dependency)
        raise ProviderUnavailable(
            f"flash-linear-attention is not installed ({type(exc).__name__}: {exc}); put its wheels in .whl/ "
            "(benchmarks/README.md)") from exc
    return getattr(module, name)


def import_fla_chunk_linear_attn() -> Callable:
    return _import_fla_linear_attn("chunk_linear_attn")


def import_fla_fused_recurrent_linear_attn() -> Callable:
    return _import_fla_linear_attn("fused_recurrent_linear_attn")


def fla_version() -> str | None:
    import importlib.metadata

    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def fla_step(feature_map: str, normalize: bool, scale: float) -> Callable[..., Tensor]:
    """What an fla user decodes with: the feature map in PyTorch, then fused_recurrent_linear_attn with the state
    handed in and the new one returned. fla keeps no key sum between calls (its normalize divides by this call's
    tokens only), so normalize is not the same function and is left out."""
    if normalize:
        raise ProviderUnavailable("fla's recurrent normalize has no key-sum state: not the same function")
    fused_recurrent_linear_attn = import_fla_fused_recurrent_linear_attn()
    phi = _FEATURE_MAPS[feature_map]

    def step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, key_sum: Tensor | None = None) -> Tensor:
        return fused_recurrent_linear_attn(phi(q), phi(k), v, scale=scale, initial_state=state,
                                           output_final_state=True)[0]

    return step


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
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Timed:
    """What every case class shares: how it is timed beyond fwd, bwd and fwd+bwd, and its id.

    sweep: the axis of the size sweep the case is a point of ("M", "T", "N", "tokens"); a sweep point is timed
      fwd+bwd only and drawn as time against that size. graph: also time fwd+bwd replayed from a CUDA graph (small
      shapes, where the per-call launch and dispatch cost shows). max_autotune: also time
      torch.compile(mode="max-autotune") (fwd+bwd only: its compile autotunes every GEMM, minutes per case, so one
      or two headline cases per family have it).
    The compiled provider is timed fwd and fwd+bwd: its bwd would need a compile of its own."""

    sweep: str | None = None
    graph: bool = False
    max_autotune: bool = False

    op: ClassVar[str]
    providers: ClassVar[tuple[str, ...]] = ("eager", "compiled", "triton", "cuda")

    @property
    def id(self) -> str:
        return f"{self.op}-{self.label}-{DTYPE_NAMES[self.dtype]}"

    def __str__(self) -> str:
        return self.id

    def runs(self, device: str) -> list[tuple[str, str]]:
        """The (provider, mode) pairs timed on `device` ("cuda" or "cpu"), a provider's modes together."""
        if device == "cpu":
            return [(p, m) for p in CPU_PROVIDERS if p in (*self.providers, "reference") for m in MODES[:3]]
        modes = ["fwd+bwd"] if self.sweep else list(MODES[:3])
        if self.graph:
            modes.append("fwd+bwd-graph")
        # bwd of a compiled function would need a compile of its own (torch.compile donates the buffers its backward
        # saved, and such a backward refuses the retain_graph=True the bwd step replays with): left out.
        # cuda-wgmma's backward is cuda's: its bwd would time the same kernels again.
        pairs = [(p, m) for p in self.providers for m in modes if not (p in ("compiled", WGMMA) and m == "bwd")]
        if self.max_autotune:
            pairs.append(("max-autotune", "fwd+bwd"))
        return pairs

    @property
    def sweep_x(self) -> int | None:
        """The size this case has on its sweep's axis."""
        return None if self.sweep is None else self._sweep_value()

    def _common(self) -> dict:
        return dict(id=self.id, op=self.op, label=self.label, shape=self.shape, options=self.options,
                    dtype=DTYPE_NAMES[self.dtype], sweep=self.sweep, sweep_x=self.sweep_x, counting=self.COUNTING,
                    flops_fwd=self.flops("fwd"), flops_fwd_bwd=self.flops("fwd+bwd"), flops_bwd=self.flops("bwd"),
                    bytes_fwd=self.min_bytes("fwd"), bytes_fwd_bwd=self.min_bytes("fwd+bwd"),
                    bytes_bwd=self.min_bytes("bwd"))


@dataclasses.dataclass(frozen=True)
class Case(_Timed):
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
    save_projections: bool = False  # poly_chain's fused providers keep z for the backward (no recompute GEMM)

    @property
    def providers(self) -> tuple[str, ...]:
        return (*_Timed.providers, WGMMA) if self.op == "poly_chain" else _Timed.providers

    COUNTING: ClassVar[str] = ("poly_chain / poly_ncp / CCP / NCP: model FLOPs are the matmuls, forward 2·M·N·k·d "
                               "(+ 2·M·(N−1)·k² for NCP, + the classifier for the modules), backward 2× forward; "
                               "bytes are x, the weights and y once (backward: x, weights, dy, dx, dweight)")

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
        if self.save_projections:
            options.append("save_projections")
        return ", ".join(options)

    def _sweep_value(self) -> int:
        return self.M

    def describe(self) -> dict:
        """JSON-ready description: shape, options, and the FLOP and byte counts the rates are computed from."""
        chain = self.op == "poly_chain"
        return dict(self._common(), M=self.M, d=self.d, k=self.k, N=self.N, bias=self.bias,
                    mode=self.mode if chain else None, activation=self.activation if chain else None,
                    scale=self.scale if chain else None, save_projections=self.save_projections)

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
        return _by_mode(mode, fwd, 2 * fwd)

    def min_bytes(self, mode: str) -> int:
        """Compulsory traffic: forward reads x and the weights and writes y; backward reads x, the weights and dy
        and writes dx and dweight."""
        out = self.n_classes if self.op in ("CCP", "NCP") else self.k
        x, w, y = self.M * self.d, self._weight_numel(), self.M * out
        return _itemsize(self.dtype) * _by_mode(mode, x + w + y, 2 * x + 2 * w + y)


# A T x T tensor of scores up to this size runs the masked form in the eager baseline; above it the chunked form.
# Its forward + backward holds about four of them (scores, the masked scores saved for the backward, their gradient
# and its masked copy), so 4 GiB keeps it well inside an 80 GB GPU next to the float64 reference.
MASKED_FORM_MAX_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class LinearAttentionCase(_Timed):
    """One causal_linear_attention benchmark: q, k [B, T, H, Dk], v [B, T, H, Dv], dtype and options. `eager` picks
    the eager baseline's form: "masked", "chunked" or "auto" (masked when its T x T scores fit
    MASKED_FORM_MAX_BYTES). decode: one decoding step (T = 1) from a float32 state [B, H, Dk, Dv] (and key sum),
    returning the new one (causal_linear_attention_step); timed fwd only, as inference runs it."""

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
    decode: bool = False

    op: ClassVar[str] = "linear_attention"
    providers: ClassVar[tuple[str, ...]] = ("eager", "compiled", "fla", "triton", "cuda")
    COUNTING: ClassVar[str] = (
        f"linear_attention: model FLOPs are the matmuls of the chunked algorithm ({CHUNK}-token chunks C, full C×C "
        "score blocks, nothing recomputed), per token and head forward 2·C·(Dk+Dv') (intra-chunk scores and their "
        "product with V) + 4·Dk·Dv' (phi(Q)·S and the state update phi(K)ᵀV), Dv' = Dv + 1 with normalize "
        "(the key-sum column); backward 2× forward (dQ, dK, dV, dS). Bytes: q, k, v, o forward; q, k, v, o, do, dq, "
        "dk, dv forward+backward (each once: the byte floor)")

    def __post_init__(self):
        if self.decode and self.T != 1:
            raise ValueError(f"a decode case has T = 1, got T = {self.T}")

    def runs(self, device: str) -> list[tuple[str, str]]:
        pairs = super().runs(device)
        return [(p, m) for p, m in pairs if m == "fwd"] if self.decode else pairs

    @property
    def shape(self) -> str:
        return f"B={self.B} T={self.T} H={self.H} Dk={self.Dk} Dv={self.Dv}"

    @property
    def state_bytes(self) -> int:
        """The float32 state (and key sum) a decode step reads and writes."""
        return 4 * self.B * self.H * self.Dk * (self.Dv + self.normalize) if self.decode else 0

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
        if self.decode:
            return "one step: S + phi(k)^T v, then phi(q) S (/ phi(q) . z), in float32"
        gb = f"{self.scores_bytes / 1e9:.3g} GB"
        if self.eager_form == "masked":
            return f"masked form ((phi(Q) phi(K)^T) ∘ M) V, T x T scores {gb}"
        return f"chunked form ({CHUNK}-token chunks, cumsum of chunk states; the T x T scores would take {gb})"

    @property
    def options(self) -> str:
        options = [self.feature_map, f"normalize (eps {self.eps:g})" if self.normalize else "no normalize"]
        if self.decode:
            options.append("decode step with state")
        if self.scale != 1.0:
            options.append(f"scale {self.scale:.4g}")
        return ", ".join(options)

    def _sweep_value(self) -> int:
        return self.T

    def describe(self) -> dict:
        return dict(self._common(), B=self.B, T=self.T, H=self.H, Dk=self.Dk, Dv=self.Dv,
                    feature_map=self.feature_map, normalize=self.normalize, scale=self.scale, eps=self.eps,
                    decode=self.decode, eager=self.eager_description)

    def flops(self, mode: str) -> int:
        value_dim = self.Dv + self.normalize
        intra = 0 if self.decode else 2 * CHUNK * (self.Dk + value_dim)  # a step has no chunk to mask
        fwd = self.B * self.T * self.H * (intra + 4 * self.Dk * value_dim)
        return _by_mode(mode, fwd, 2 * fwd)

    def min_bytes(self, mode: str) -> int:
        """fwd: read q, k, v, write o; bwd: read q, k, v, do, write dq, dk, dv; fwd+bwd: q, k, v, o, do, dq, dk, dv
        once each (a fused forward + backward need not read q, k, v twice). A decode step also reads the state and
        writes the new one (fwd only)."""
        qk, v = self.B * self.T * self.H * self.Dk, self.B * self.T * self.H * self.Dv
        n = {"fwd": 2 * qk + 2 * v, "bwd": 4 * qk + 3 * v, "fwd+bwd": 4 * qk + 4 * v}[_base_mode(mode)]
        return _itemsize(self.dtype) * n + 2 * self.state_bytes


@dataclasses.dataclass(frozen=True)
class PolySACase(_Timed):
    """One poly_sa benchmark (the PolySA module's op, no mask): z [B, N, C], w1, w2, w3 [C, C], dtype."""

    label: str
    B: int
    N: int
    C: int
    dtype: torch.dtype = torch.bfloat16

    op: ClassVar[str] = "poly_sa"
    COUNTING: ClassVar[str] = ("poly_sa: model FLOPs are the three B·N×C×C matmuls, forward 6·B·N·C², backward 2× "
                               "forward (the fused backward recomputes the pool and the projections, not counted); "
                               "bytes: z, the weights and Y forward; z, the weights, dY, dz and the weight gradients "
                               "backward")

    @property
    def shape(self) -> str:
        return f"B={self.B} N={self.N} C={self.C}"

    @property
    def options(self) -> str:
        return "no mask"

    def _sweep_value(self) -> int:
        return self.N

    def describe(self) -> dict:
        return dict(self._common(), B=self.B, N=self.N, C=self.C, input_bytes=self.input_bytes)

    @property
    def input_bytes(self) -> int:
        """z, the three weights and alpha, beta: what issue 16 bounds the saved-for-backward bytes by."""
        return _itemsize(self.dtype) * (self.B * self.N * self.C + 3 * self.C * self.C + 2)

    def flops(self, mode: str) -> int:
        fwd = 6 * self.B * self.N * self.C * self.C
        return _by_mode(mode, fwd, 2 * fwd)

    def min_bytes(self, mode: str) -> int:
        """fwd: read z and the weights, write Y; bwd: read z, the weights and dY, write dz and the weight gradients;
        fwd+bwd: both."""
        z, w = self.B * self.N * self.C, 3 * self.C * self.C + 2
        return _itemsize(self.dtype) * _by_mode(mode, 2 * z + w, 3 * z + 2 * w)


@dataclasses.dataclass(frozen=True)
class PolyGateCase(_Timed):
    """One poly_gate benchmark (MONet's PolyMlp gate between its linear layers): a, b [B, W, H, C] (the hidden
    activations U1 x and U3(U2 x) of B images of W x H pixels), LayerNorm affines [C], a scalar alpha, with or without
    the spatial shift of a."""

    label: str
    B: int
    W: int
    H: int
    C: int
    spatial: bool = True
    dtype: torch.dtype = torch.bfloat16
    eps: float = 1e-6

    op: ClassVar[str] = "poly_gate"
    COUNTING: ClassVar[str] = ("poly_gate: memory-bound, so no FLOPs are counted (judged by GB/s against the copy "
                               "bandwidth); bytes: read a and b, write the output forward; read a, b and dout, write "
                               "da and db backward (the [C] parameters are left out)")

    @property
    def shape(self) -> str:
        return f"B={self.B} W={self.W} H={self.H} C={self.C}"

    @property
    def options(self) -> str:
        return "spatial shift" if self.spatial else "no shift"

    @property
    def tokens(self) -> int:
        return self.B * self.W * self.H

    def _sweep_value(self) -> int:
        return self.tokens

    def describe(self) -> dict:
        return dict(self._common(), B=self.B, W=self.W, H=self.H, C=self.C, spatial_shift=self.spatial)

    def flops(self, mode: str) -> int:
        return 0

    def min_bytes(self, mode: str) -> int:
        n = self.tokens * self.C
        return _itemsize(self.dtype) * _by_mode(mode, 3 * n, 5 * n)


def _base_mode(mode: str) -> str:
    """fwd+bwd-graph computes what fwd+bwd does."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return "fwd+bwd" if mode == "fwd+bwd-graph" else mode


def _by_mode(mode: str, fwd: int, bwd: int) -> int:
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[_base_mode(mode)]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


@dataclasses.dataclass(frozen=True)
class LRNNCase(_Timed):
    """One LRNN benchmark. op "lrnn": `lrnn_product` on x [M, d] with weight [rank·dbar, d] (an INR layer on M
    coordinates). op "LRNN": the deep module hk.nn.LRNN(d, [rank] * layers, out_features, dbar) (layers of
    lrnn_product, LayerNorm between them, the output map S_out) against the same network written in PyTorch."""

    op: str
    label: str
    M: int
    d: int
    rank: int
    dbar: int
    activation: str = "sin"
    layers: int = 1
    out_features: int = 3
    dtype: torch.dtype = torch.bfloat16

    COUNTING: ClassVar[str] = ("lrnn / LRNN: model FLOPs are the projections, forward 2·M·d·rank·dbar per layer "
                               "(+ 2·M·rank·out for the module's S_out), backward 2× forward (the fused backward's "
                               "recompute of z is not counted); bytes: x, the weights and the output forward; x, the "
                               "weights, the output gradient, dx and the weight gradients backward (the module's "
                               "activations between layers are not counted)")

    @property
    def shape(self) -> str:
        if self.op == "lrnn":
            return f"M={self.M} d={self.d} rank={self.rank} dbar={self.dbar}"
        return f"M={self.M} d={self.d} ranks={self.layers}x{self.rank} dbar={self.dbar} out={self.out_features}"

    @property
    def options(self) -> str:
        return self.activation + (", LayerNorm between layers" if self.op == "LRNN" else "")

    def _sweep_value(self) -> int:
        return self.M

    def describe(self) -> dict:
        return dict(self._common(), M=self.M, d=self.d, rank=self.rank, dbar=self.dbar, activation=self.activation,
                    layers=self.layers, out_features=self.out_features if self.op == "LRNN" else None)

    def _layer_dims(self) -> list[tuple[int, int]]:
        """(in, out) of every projection: (d, rank·dbar), (rank, rank·dbar), ..., and S_out for the module."""
        dims = [(self.d, self.rank * self.dbar)] + [(self.rank, self.rank * self.dbar)] * (self.layers - 1)
        return dims + ([(self.rank, self.out_features)] if self.op == "LRNN" else [])

    def flops(self, mode: str) -> int:
        fwd = sum(2 * self.M * fan_in * fan_out for fan_in, fan_out in self._layer_dims())
        return _by_mode(mode, fwd, 2 * fwd)

    def min_bytes(self, mode: str) -> int:
        out = self.out_features if self.op == "LRNN" else self.rank
        x, y = self.M * self.d, self.M * out
        w = sum((fan_in + 1) * fan_out for fan_in, fan_out in self._layer_dims())
        if self.op == "LRNN":
            w += 2 * self.rank * self.layers  # the LayerNorms
        return _itemsize(self.dtype) * _by_mode(mode, x + w + y, 2 * x + 2 * w + y)


AnyCase = Case | LinearAttentionCase | PolySACase | PolyGateCase | LRNNCase
CASE_TYPES = (Case, LinearAttentionCase, PolySACase, PolyGateCase, LRNNCase)


# ---------------------------------------------------------------- case lists
# The shapes of issue 19 for poly_chain and poly_ncp: 64k rows, from memory-bound (d = k = 64) to GEMM-bound.
POLY_SHAPES = [(64, 64, 4), (256, 256, 8), (1024, 1024, 4), (4096, 4096, 2)]  # (d, k, N)


def poly_chain_cases(quick: bool = False) -> list[Case]:
    """The issue-19 shapes (M = 65536, bf16; fp16 and fp32 for a subset) and the survey's MNIST CCP layer (batch 4096,
    d 784, k 16, N 4), then Π-net layers on images, a PNN (NTK) chain and transformer-MLP-like gates (the H100 probe's
    M16384 d1024 k1024 N3 among them). The quick set comes first."""
    quick_cases = [
        Case("poly_chain", "mnist-ccp", M=4096, d=784, k=16, N=4, graph=True, max_autotune=True),
        Case("poly_chain", "M65536-d1024-k1024-N4", M=65536, d=1024, k=1024, N=4, max_autotune=True),
    ]
    if quick:
        return quick_cases
    return quick_cases + [
        *(Case("poly_chain", f"M65536-d{d}-k{k}-N{N}", M=65536, d=d, k=k, N=N) for d, k, N in POLY_SHAPES if d != 1024),
        Case("poly_chain", "M65536-d1024-k1024-N4", M=65536, d=1024, k=1024, N=4, dtype=torch.float16),
        Case("poly_chain", "M65536-d1024-k1024-N4", M=65536, d=1024, k=1024, N=4, dtype=torch.float32),
        Case("poly_chain", "M65536-d64-k64-N4", M=65536, d=64, k=64, N=4, dtype=torch.float32),
        Case("poly_chain", "pinet-mnist", M=4096, d=784, k=64, N=4),
        Case("poly_chain", "pinet-cifar", M=8192, d=3072, k=256, N=8),
        # scale sqrt(2) with unit-variance pre-activations keeps E[u^2] = 1, so the product stays O(1).
        Case("poly_chain", "pnn-relu", M=8192, d=1024, k=512, N=4, mode="product", activation="relu", bias=False,
             scale=math.sqrt(2)),
        Case("poly_chain", "mlp-bilinear", M=16384, d=1024, k=1024, N=2, mode="product"),
        Case("poly_chain", "mlp-ccp3", M=16384, d=1024, k=1024, N=3),  # the H100 probe's shape
        # save_projections=True (z kept, no recompute GEMM) against the rows above of the same shape.
        *(Case("poly_chain", f"M65536-d{d}-k{k}-N{N}-save-z", M=65536, d=d, k=k, N=N, save_projections=True)
          for d, k, N in POLY_SHAPES[:3]),
    ]


def poly_ncp_cases(quick: bool = False) -> list[Case]:
    quick_cases = [Case("poly_ncp", "mnist", M=4096, d=784, k=64, N=4)]
    if quick:
        return quick_cases
    return quick_cases + [
        *(Case("poly_ncp", f"M65536-d{d}-k{k}-N{N}", M=65536, d=d, k=k, N=N, max_autotune=d == 1024)
          for d, k, N in POLY_SHAPES),
        Case("poly_ncp", "M65536-d256-k256-N8", M=65536, d=256, k=256, N=8, dtype=torch.float32),
        Case("poly_ncp", "cifar", M=8192, d=3072, k=256, N=4),
    ]


def module_cases(quick: bool = False) -> list[Case]:
    """hk.nn.CCP / NCP against the survey's forward on the same weights: the survey's MNIST CCP (batch 4096, hidden
    16, degree 4), hidden 128, and a CIFAR CCP."""
    quick_cases = [Case("CCP", "mnist-k16", M=4096, d=784, k=16, N=4, graph=True)]
    if quick:
        return quick_cases
    return quick_cases + [
        Case("CCP", "mnist", M=4096, d=784, k=128, N=4),
        Case("NCP", "mnist", M=4096, d=784, k=128, N=4),
        Case("CCP", "cifar", M=2048, d=3072, k=256, N=6, channels=3),
    ]


def linear_attention_cases(quick: bool = False) -> list[LinearAttentionCase]:
    """The published flash-linear-attention shapes B·T·H·D (Dk = Dv = D), bf16: identity feature map with scale
    D^-1/2, then each with the elu(x) + 1 feature map and normalize=True at scale 1 (the linear transformer's
    normalized form; with an identity map the normalizer can cross zero). The quick set is the smallest shape."""
    shapes = [(8, 1024, 8, 64), (1, 8192, 96, 128), (8, 2048, 32, 256)]
    plain = [LinearAttentionCase(f"{B}x{T}x{H}x{D}", B=B, T=T, H=H, Dk=D, Dv=D, scale=D ** -0.5,
                                 max_autotune=(B, T) == (1, 8192)) for B, T, H, D in shapes]
    if quick:
        return plain[:1]
    decode = [  # one decoding step of 64 sequences, 32 heads of 128: 268 MB of float32 state in and out
        LinearAttentionCase("decode-64x32x128", B=64, T=1, H=32, Dk=128, Dv=128, scale=128 ** -0.5, decode=True),
        LinearAttentionCase("decode-64x32x128-elu1-norm", B=64, T=1, H=32, Dk=128, Dv=128, feature_map="elu1",
                            normalize=True, decode=True),
    ]
    return plain + [LinearAttentionCase(f"{B}x{T}x{H}x{D}-elu1-norm", B=B, T=T, H=H, Dk=D, Dv=D, feature_map="elu1",
                                        normalize=True) for B, T, H, D in shapes] + decode


def poly_sa_cases(quick: bool = False) -> list[PolySACase]:
    """ViT-like token mixers (the issue's shapes): ViT-S/16 at 224 px (197 tokens, C = 384), a stage-1 pyramid
    transformer at 224 px (56 x 56 = 3136 tokens, C = 96) and a long sequence (16k tokens, C = 512), bf16; the quick
    set is the first."""
    quick_cases = [PolySACase("vit-s16", B=64, N=197, C=384, max_autotune=True)]
    if quick:
        return quick_cases
    return quick_cases + [
        PolySACase("stage1-3136", B=32, N=3136, C=96),
        PolySACase("long-16k", B=8, N=16384, C=512),
        PolySACase("vit-s16", B=64, N=197, C=384, dtype=torch.float32),
    ]


def poly_gate_cases(quick: bool = False) -> list[PolyGateCase]:
    """MONet's gate (issue 18): B = 64 images of 28 x 28 tokens, hidden 192·3 = 576 and 384·3 = 1152, with the spatial
    shift (the block's first PolyMlp) and without (the second), bf16; fp32 for one."""
    quick_cases = [PolyGateCase("monet-576-shift", B=64, W=28, H=28, C=576, max_autotune=True)]
    if quick:
        return quick_cases
    return quick_cases + [
        PolyGateCase("monet-576", B=64, W=28, H=28, C=576, spatial=False),
        PolyGateCase("monet-1152-shift", B=64, W=28, H=28, C=1152),
        PolyGateCase("monet-1152", B=64, W=28, H=28, C=1152, spatial=False),
        PolyGateCase("monet-576-shift", B=64, W=28, H=28, C=576, dtype=torch.float32),
    ]


def sweep_cases() -> list[AnyCase]:
    """One size sweep per family (bf16, fwd+bwd; the two smallest points also from a CUDA graph): poly_chain and
    poly_ncp over M rows, linear attention over T, poly_sa over N tokens, poly_gate over B·W·H tokens, lrnn over M
    coordinates."""
    rows = (1024, 4096, 16384, 65536, 262144)
    out: list[AnyCase] = []
    for i, M in enumerate(rows):
        out.append(Case("poly_chain", f"sweep-M{M}", M=M, d=1024, k=1024, N=4, sweep="M", graph=i < 2))
        out.append(Case("poly_ncp", f"sweep-M{M}", M=M, d=784, k=64, N=4, sweep="M", graph=i < 2))
    for i, T in enumerate((512, 2048, 8192, 32768)):
        out.append(LinearAttentionCase(f"sweep-T{T}", B=1, T=T, H=16, Dk=64, Dv=64, scale=0.125, sweep="T",
                                       graph=i < 2))
    for i, N in enumerate((197, 784, 3136, 12544)):
        out.append(PolySACase(f"sweep-N{N}", B=8, N=N, C=384, sweep="N", graph=i < 2))
    for i, B in enumerate((1, 4, 16, 64, 256)):
        out.append(PolyGateCase(f"sweep-B{B}", B=B, W=28, H=28, C=576, sweep="tokens", graph=i < 2))
    out += lrnn_sweep_cases()
    return out


def all_cases(quick: bool = False) -> list[AnyCase]:
    """The GPU cases: the quick ones first, then the rest, then the sweeps, each part taking the families in turn, so
    a run cut short by a time budget has covered every family."""
    families = [poly_chain_cases, linear_attention_cases, poly_ncp_cases, poly_gate_cases, module_cases,
                poly_sa_cases, lrnn_cases]
    first = _interleave([f(quick=True) for f in families])
    if quick:
        return first
    rest = _interleave([[c for c in f() if c not in first] for f in families])
    sweeps = sweep_cases()
    by_op = {}
    for case in sweeps:
        by_op.setdefault(case.op, []).append(case)
    return first + rest + _interleave(list(by_op.values()))


def cpu_cases() -> list[AnyCase]:
    """Tiny float32 shapes, one or two per family, that a CPU runs in seconds through the reference, the Triton
    interpreter and eager: the pipeline check of a machine without a GPU (times are CPU times, not kernel speed)."""
    return [
        Case("poly_chain", "cpu-tiny", M=64, d=32, k=16, N=3, dtype=torch.float32),
        Case("poly_ncp", "cpu-tiny", M=64, d=32, k=16, N=3, dtype=torch.float32),
        Case("CCP", "cpu-tiny", M=16, d=64, k=16, N=3, dtype=torch.float32),
        LinearAttentionCase("cpu-tiny", B=1, T=64, H=2, Dk=16, Dv=16, dtype=torch.float32, scale=0.25),
        PolySACase("cpu-tiny", B=2, N=16, C=16, dtype=torch.float32),
        PolyGateCase("cpu-tiny", B=2, W=4, H=3, C=16, dtype=torch.float32),
        *lrnn_cpu_cases(),
    ]


def _interleave(lists: list[list]) -> list:
    return [items[i] for i in range(max(map(len, lists))) for items in lists if i < len(items)]


def lrnn_cases(quick: bool = False) -> list[LRNNCase]:
    """Issue 17's shapes: an implicit neural representation's layer on a batch of 65536 pixel coordinates (d = 2,
    rank 256, dbar 8; sin, and spder as in the LRNN-SPDER image fit), and a deep LRNN on the same batch (4 layers of
    rank 512, dbar 16, LayerNorm between them, 3 outputs), bf16."""
    quick_cases = [LRNNCase("lrnn", "inr", M=65536, d=2, rank=256, dbar=8, max_autotune=True)]
    if quick:
        return quick_cases
    return quick_cases + [
        LRNNCase("LRNN", "deep", M=65536, d=2, rank=512, dbar=16, layers=4),
        LRNNCase("lrnn", "inr-spder", M=65536, d=2, rank=256, dbar=8, activation="spder"),
    ]


def lrnn_sweep_cases() -> list[LRNNCase]:
    return [LRNNCase("lrnn", f"sweep-M{M}", M=M, d=2, rank=256, dbar=8, sweep="M", graph=i < 2)
            for i, M in enumerate((4096, 16384, 65536, 262144))]


def lrnn_cpu_cases() -> list[LRNNCase]:
    return [LRNNCase("lrnn", "cpu-tiny", M=64, d=2, rank=8, dbar=4, dtype=torch.float32)]


# ---------------------------------------------------------------- workloads
@dataclasses.dataclass
class Workload:
    """A provider's forward on one case's inputs: `forward()` returns the output; `leaves` are the tensors whose
    gradients a backward of `grad_out` fills (inputs, then weights)."""

    forward: Callable[[], Tensor]
    leaves: list[Tensor]
    grad_out: Tensor


def _randn(g: torch.Generator, shape, std: float, device, dtype, mean: float = 0.0) -> Tensor:
    # Drawn in float32 and rounded to the case dtype first, so every provider and the float64 reference see the
    # same values.
    return (torch.randn(shape, generator=g, device=device) * std + mean).to(dtype)


def make_workload(case: AnyCase, provider: str, device="cuda", dtype: torch.dtype | None = None) -> Workload:
    """`provider` in case.providers, "max-autotune", or "reference" (with dtype=torch.float64 for the oracle).
    `dtype` overrides the compute dtype; the values are always those of the case dtype. Raises ProviderUnavailable
    for a provider that cannot run here (fla not installed, or an option it lacks)."""
    if provider not in (*case.providers, "max-autotune", "reference"):
        raise ValueError(f"provider must be one of {case.providers}, 'max-autotune' or 'reference' for {case}, got "
                         f"{provider!r}")
    dtype = dtype or case.dtype
    make = {LinearAttentionCase: _linear_attention_workload, PolySACase: _poly_sa_workload,
            PolyGateCase: _poly_gate_workload, LRNNCase: _lrnn_workload}.get(type(case), _poly_workload)
    return make(case, provider, device, dtype)


def _op(eager: Callable, fused: Callable, provider: str, **options) -> Callable:
    """The provider's function of the inputs: eager's formula (compiled for the compile providers), or the fused op
    with that backend."""
    if provider in BASELINES:
        return _baseline(functools.partial(eager, **options), provider)
    fn = functools.partial(fused, **options, backend=backend_of(provider))
    return _with_wgmma(fn) if provider == WGMMA else fn


def _with_wgmma(fn: Callable) -> Callable:
    """fn with the cuda backend's Hopper forward switched on (HADAMARD_KERNELS_CUDA_WGMMA=1) during each call."""
    if not hk._backend.is_hopper():
        raise ProviderUnavailable("cuda-wgmma: the Hopper forward needs an sm_90 GPU (H100, H200)")
    name = hk._backend.ENV_CUDA_WGMMA

    def call(*args, **kwargs):
        saved = os.environ.get(name)
        os.environ[name] = "1"
        try:
            return fn(*args, **kwargs)
        finally:
            if saved is None:
                del os.environ[name]
            else:
                os.environ[name] = saved

    return call


def _poly_sa_workload(case: PolySACase, provider: str, device, dtype: torch.dtype) -> Workload:
    g = torch.Generator(device=device).manual_seed(0)
    # The survey's initialisation: weights randn / sqrt(C), alpha and beta randn.
    shapes_stds = [((case.B, case.N, case.C), 1.0), *[((case.C, case.C), case.C ** -0.5)] * 3, ((1,), 1.0),
                   ((1,), 1.0)]
    inputs = [_randn(g, shape, std, device, case.dtype).to(dtype).requires_grad_() for shape, std in shapes_stds]
    grad_out = _randn(g, (case.B, case.N, case.C), 1.0, device, case.dtype).to(dtype)
    fn = _op(poly_sa_eager, hk.poly_sa, provider)
    return Workload(functools.partial(fn, *inputs), inputs, grad_out)


def _poly_gate_workload(case: PolyGateCase, provider: str, device, dtype: torch.dtype) -> Workload:
    g = torch.Generator(device=device).manual_seed(0)
    act, C = (case.B, case.W, case.H, case.C), (case.C,)
    # a, b: the hidden activations; LayerNorm affines near their init (ones, zeros); PolyMlp's scalar alpha.
    shapes = [(act, 1.0, 0.0), (act, 1.0, 0.0), (C, 0.1, 1.0), (C, 0.1, 0.0), (C, 0.1, 1.0), (C, 0.1, 0.0),
              ((1,), 0.1, 1.0)]
    inputs = [_randn(g, shape, std, device, case.dtype, mean).to(dtype).requires_grad_() for shape, std, mean in shapes]
    grad_out = _randn(g, act, 1.0, device, case.dtype).to(dtype)
    fn = _op(poly_gate_eager, hk.poly_gate, provider, eps=case.eps, spatial_shift=case.spatial)
    return Workload(functools.partial(fn, *inputs), inputs, grad_out)


def _lrnn_workload(case: LRNNCase, provider: str, device, dtype: torch.dtype) -> Workload:
    g = torch.Generator(device=device).manual_seed(0)
    x = _randn(g, (case.M, case.d), 1.0, device, case.dtype).to(dtype).requires_grad_()
    if case.op == "LRNN":
        torch.manual_seed(0)
        model = hk.nn.LRNN(case.d, [case.rank] * case.layers, case.out_features, case.dbar, case.activation,
                           backend=backend_of(provider))
        model = model.to(device=device, dtype=case.dtype).to(dtype)  # the case dtype's values, like the inputs
        fn = _baseline(functools.partial(lrnn_deep_eager, model), provider) if provider in BASELINES else model
        forward, leaves, out_features = functools.partial(fn, x), [x, *model.parameters()], case.out_features
    else:
        # z = x W^T + b with unit variance: the activation's working range.
        weight = _randn(g, (case.rank * case.dbar, case.d), case.d ** -0.5, device, case.dtype).to(dtype)
        bias = _randn(g, (case.rank * case.dbar,), 0.1, device, case.dtype).to(dtype)
        inputs = [x, weight.requires_grad_(), bias.requires_grad_()]
        fn = _op(lrnn_product_eager, hk.lrnn_product, provider, rank=case.rank, dbar=case.dbar,
                 activation=case.activation)
        forward, leaves, out_features = functools.partial(fn, *inputs), inputs, case.rank
    grad_out = _randn(g, (case.M, out_features), 1.0, device, case.dtype).to(dtype)
    return Workload(forward, leaves, grad_out)


def _linear_attention_workload(case: LinearAttentionCase, provider: str, device, dtype: torch.dtype) -> Workload:
    g = torch.Generator(device=device).manual_seed(0)
    qk_shape, v_shape = (case.B, case.T, case.H, case.Dk), (case.B, case.T, case.H, case.Dv)
    inputs = [_randn(g, shape, 1.0, device, case.dtype).to(dtype).requires_grad_()
              for shape in (qk_shape, qk_shape, v_shape)]
    grad_out = _randn(g, v_shape, 1.0, device, case.dtype).to(dtype)
    if case.decode:
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = _randn(g, (case.B, case.H, case.Dk, case.Dv), 1.0, device, torch.float32).to(state_dtype)
        # a key sum of ~1000 positive features: a decoder some way into its sequence
        key_sum = (_randn(g, (case.B, case.H, case.Dk), 1.0, device, torch.float32).abs() * 1000 + 1).to(state_dtype)
        states = (state, key_sum if case.normalize else None)
        options = dict(feature_map=case.feature_map, normalize=case.normalize, scale=case.scale)
        if provider == "fla":
            fn = functools.partial(fla_step(case.feature_map, case.normalize, case.scale), *inputs, *states)
        elif provider in BASELINES:
            eager = _baseline(functools.partial(linear_attention_step, eps=case.eps, **options), provider)
            fn = functools.partial(eager, *inputs, *states)
        else:
            step = functools.partial(hk.causal_linear_attention_step, *inputs,
                                     states if case.normalize else state, eps=case.eps, backend=backend_of(provider),
                                     **options)
            fn = lambda: step()[0]  # noqa: E731 (o; the new state is written too)
        return Workload(fn, inputs, grad_out)
    if provider == "fla":
        fn = fla_forward(case.feature_map, case.normalize, case.scale)
    else:
        eager = linear_attention_masked if case.eager_form == "masked" else linear_attention_chunked
        fn = _op(eager, hk.causal_linear_attention, provider, feature_map=case.feature_map, normalize=case.normalize,
                 scale=case.scale, eps=case.eps)
    return Workload(functools.partial(fn, *inputs), inputs, grad_out)


def _poly_workload(case: Case, provider: str, device, dtype: torch.dtype) -> Workload:
    g = torch.Generator(device=device).manual_seed(0)
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    if case.op in ("CCP", "NCP"):
        torch.manual_seed(0)
        cls = hk.nn.CCP if case.op == "CCP" else hk.nn.NCP
        model = cls(hidden_size=case.k, image_size=case.image_size, channels_in=case.channels, n_degree=case.N,
                    bias=case.bias, n_classes=case.n_classes,
                    backend=backend_of(provider))
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
            if provider == WGMMA and dtype not in (torch.float16, torch.bfloat16):
                raise ProviderUnavailable("cuda-wgmma: float16/bfloat16 only (wgmma has no exact float32)")
            inputs = [cast(t) for t in (x, weight, bias)]
            fused = functools.partial(hk.poly_chain, save_projections=case.save_projections)
            fn = _op(poly_chain_eager, fused, provider, mode=case.mode, activation=case.activation, scale=case.scale)
        else:
            s_weight = _randn(g, (case.N - 1, case.k, case.k), case.k ** -0.5, device, case.dtype)
            s_bias = _randn(g, (case.N - 1, case.k), 0.1, device, case.dtype) if case.bias else None
            inputs = [cast(t) for t in (x, weight, bias, s_weight, s_bias)]
            fn = _op(poly_ncp_eager, hk.poly_ncp, provider)
        leaves = [t for t in inputs if t is not None]
        forward = functools.partial(fn, *inputs)
        out_features = case.k
    grad_out = _randn(g, (case.M, out_features), 1.0, device, case.dtype).to(dtype)
    return Workload(forward, leaves, grad_out)


def _baseline(fn: Callable, provider: str) -> Callable:
    if provider == "eager":
        return fn
    if provider == "fla":
        raise ValueError("fla is linear attention's provider only")
    # A fresh Dynamo cache per workload: cases would otherwise pile up recompilations of the same function until
    # Dynamo's recompile limit silently falls back to eager.
    torch._dynamo.reset()
    if provider == "max-autotune":  # autotuned GEMM templates, and CUDA graphs of its own
        return torch.compile(fn, dynamic=False, mode="max-autotune")
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
    """The callable a timer repeats (no synchronization inside). fwd: inference forward (no autograd graph); bwd: the
    backward of one retained forward graph; fwd+bwd (and fwd+bwd-graph, which captures this step): both."""
    leaves = work.leaves
    mode = _base_mode(mode)

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
    else:
        def step():
            clear_grads()
            work.forward().backward(work.grad_out)
    return step


def rates(case: AnyCase, mode: str, ms: float) -> dict:
    """TFLOP/s (model FLOPs; None for a case that counts none) and GB/s (compulsory bytes) of `case` in `mode` run
    in `ms` milliseconds."""
    flops = case.flops(mode)
    return dict(tflops=flops / ms / 1e9 if flops else None, gbps=case.min_bytes(mode) / ms / 1e6)
