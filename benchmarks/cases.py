"""What the benchmarks measure, shared by the pytest-benchmark files and run.py.

- the plain-PyTorch formulas a user would write (the `eager` baseline; `compiled` is torch.compile of the same
  function), the one place they live;
- `Case`: one model-like shape and dtype, with its model FLOP and minimal-byte counts;
- `make_workload`: a provider's forward on a case's inputs (same values for every provider);
- the accuracy check against the float64 reference, and the timed steps (fwd, bwd, fwd+bwd).

Providers: eager, compiled, triton, cuda (the last two are hadamard_kernels backends).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import hadamard_kernels as hk

PROVIDERS = ("eager", "compiled", "triton", "cuda")
BASELINES = ("eager", "compiled")
MODES = ("fwd", "bwd", "fwd+bwd")
OPS = ("poly_chain", "poly_ncp", "CCP", "NCP")

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

    @property
    def id(self) -> str:
        return f"{self.op}-{self.label}-{DTYPE_NAMES[self.dtype]}"

    def __str__(self) -> str:
        return self.id

    def describe(self) -> dict:
        """JSON-ready description: shape, options, and the FLOP and byte counts the rates are computed from."""
        chain = self.op == "poly_chain"  # mode, activation and scale are poly_chain's options only
        return dict(id=self.id, op=self.op, label=self.label, M=self.M, d=self.d, k=self.k, N=self.N,
                    dtype=DTYPE_NAMES[self.dtype], bias=self.bias, mode=self.mode if chain else None,
                    activation=self.activation if chain else None, scale=self.scale if chain else None,
                    flops_fwd=self.flops("fwd"), flops_fwd_bwd=self.flops("fwd+bwd"),
                    bytes_fwd=self.min_bytes("fwd"), bytes_fwd_bwd=self.min_bytes("fwd+bwd"))

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
        size = torch.finfo(self.dtype).bits // 8
        out = self.n_classes if self.op in ("CCP", "NCP") else self.k
        x, w, y = self.M * self.d, self._weight_numel(), self.M * out
        fwd, bwd = x + w + y, 2 * x + 2 * w + y
        return size * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


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


def all_cases(quick: bool = False) -> list[Case]:
    """Every case: the quick ones first, then the rest, each part taking the families in turn, so a run cut short by
    a time budget has covered every family."""
    families = [poly_chain_cases, poly_ncp_cases, module_cases]
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


def make_workload(case: Case, provider: str, device="cuda", dtype: torch.dtype | None = None) -> Workload:
    """`provider` in PROVIDERS, or "reference" (with dtype=torch.float64 for the oracle). `dtype` overrides the
    compute dtype; the values are always those of the case dtype."""
    if provider not in (*PROVIDERS, "reference"):
        raise ValueError(f"provider must be one of {PROVIDERS} or 'reference', got {provider!r}")
    dtype = dtype or case.dtype
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
def reference_result(case: Case, device="cuda") -> tuple[Tensor, list[Tensor]]:
    """The float64 oracle (the reference backend on float64 copies of the inputs)."""
    return forward_backward(make_workload(case, "reference", device, dtype=torch.float64))


def check_accuracy(case: Case, work: Workload, device="cuda") -> dict:
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


def peak_mib(step: Callable[[], None]) -> float:
    """Device memory one call of `step` allocates beyond what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def rates(case: Case, mode: str, ms: float) -> dict:
    """TFLOP/s (model FLOPs) and GB/s (compulsory bytes) of `case` in `mode` run in `ms` milliseconds."""
    return dict(tflops=case.flops(mode) / ms / 1e9, gbps=case.min_bytes(mode) / ms / 1e6)


# ---------------------------------------------------------------- pytest-benchmark
def run_pytest_benchmark(benchmark, case: Case, provider: str, mode: str, rounds: int = 20,
                         warmup_rounds: int = 3) -> None:
    """One pytest-benchmark measurement: check accuracy once, warm up (autotune, compile), then time `mode` with
    a synchronization inside the timed callable; GB/s, TFLOP/s, errors and peak memory go to extra_info."""
    import pytest

    if provider not in BASELINES and (why := hk.available_backends("cuda", case.dtype)[provider]) is not None:
        pytest.skip(f"backend {provider} is not available: {why}")
    work = make_workload(case, provider)
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
