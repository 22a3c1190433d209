"""`python -m hadamard_kernels check`: every op on every backend available here, against the float64 reference.

A family joins by adding one entry to CASES: a function that builds small example inputs and the call."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _backend


def _poly_chain_case(gen):
    from . import poly_chain
    N, k, d = 3, 23, 45
    inputs = [torch.randn(37, d, generator=gen), torch.randn(N, k, d, generator=gen) / math.sqrt(d),
              torch.randn(N, k, generator=gen) * 0.5]

    def call(x, w, b, backend):
        return poly_chain(x, w, b, mode="ccp", activation="tanh", scale=0.7, backend=backend)

    return inputs, call


def _poly_ncp_case(gen):
    from . import poly_ncp
    N, k, d = 3, 23, 45
    inputs = [torch.randn(37, d, generator=gen), torch.randn(N, k, d, generator=gen) / math.sqrt(d),
              torch.randn(N, k, generator=gen) * 0.5, torch.randn(N - 1, k, k, generator=gen) / math.sqrt(k),
              torch.randn(N - 1, k, generator=gen) * 0.5]
    return inputs, lambda x, aw, ab, sw, sb, backend: poly_ncp(x, aw, ab, sw, sb, backend=backend)


def _linear_attention_case(gen):
    from . import causal_linear_attention
    from .ops.linear_attention.common import state_dtype
    # 4 chunks of 64 tokens on 2 heads: on a GPU both fused backends cut the sequence into segments (SegmentPlan)
    B, T, H, Dk, Dv = 1, 200, 2, 20, 12
    inputs = [torch.randn(B, T, H, Dk, generator=gen), torch.randn(B, T, H, Dk, generator=gen),
              torch.randn(B, T, H, Dv, generator=gen), torch.randn(B, H, Dk, Dv, generator=gen),
              1 + torch.rand(B, H, Dk, generator=gen)]

    def call(q, k, v, state, key_sum, backend):
        # States are float32 (float64 for float64 inputs) whatever the dtype of q, k, v.
        initial = (state.to(state_dtype(q.dtype)), key_sum.to(state_dtype(q.dtype)))
        return causal_linear_attention(q, k, v, feature_map="elu1", normalize=True, scale=0.5, initial_state=initial,
                                       backend=backend)

    return inputs, call


def _poly_gate_case(gen):
    from . import poly_gate
    B, W, H, C = 2, 5, 6, 37  # odd C: the four shifted channel groups are 9, 9, 9, 10 wide
    inputs = [torch.randn(B, W, H, C, generator=gen), torch.randn(B, W, H, C, generator=gen)]
    inputs += [1 + 0.2 * torch.randn(C, generator=gen) if i % 2 == 0 else 0.2 * torch.randn(C, generator=gen)
               for i in range(4)]
    inputs.append(torch.full((1,), 0.7))  # PolyMlp's alpha: a (1,) parameter

    def call(a, b, w1, b1, w2, b2, alpha, backend):
        return poly_gate(a, b, w1, b1, w2, b2, alpha, spatial_shift=True, backend=backend)

    return inputs, call


def _ragged_mask(z, lengths):
    """(B, N) bool on z's device: the first lengths[b] tokens of row b are real (a row of length 0 has none). Built
    by device fills, not a copy from host memory, so the case runs inside a CUDA graph capture too."""
    counts = torch.zeros(len(lengths), dtype=torch.long, device=z.device)
    for row, length in enumerate(lengths):
        counts[row] = length
    return torch.arange(z.shape[1], device=z.device)[None, :] < counts[:, None]


def _poly_sa_inputs(gen, B=3, N=19, C=27):
    """z (B, N, C), w1, w2, w3 (C, C) scaled as the survey's randn / sqrt(C), alpha, beta of shape (1,)."""
    return [torch.randn(B, N, C, generator=gen), *[torch.randn(C, C, generator=gen) / math.sqrt(C) for _ in range(3)],
            torch.randn(1, generator=gen), torch.randn(1, generator=gen)]


def _poly_sa_pool_case(gen):
    from . import poly_sa_pool
    inputs = _poly_sa_inputs(gen)[:3]  # odd C; padded tokens, and a row with no real token (m = 0)
    return inputs, lambda z, w1, w2, backend: poly_sa_pool(z, w1, w2, mask=_ragged_mask(z, [19, 6, 0]),
                                                           backend=backend)


def _poly_sa_case(gen):
    from . import poly_sa

    def call(z, w1, w2, w3, alpha, beta, backend):
        return poly_sa(z, w1, w2, w3, alpha, beta, mask=_ragged_mask(z, [19, 6, 0]), backend=backend)

    return _poly_sa_inputs(gen), call


def _lrnn_product_case(gen):
    from . import lrnn_product
    rank, dbar, d, h = 6, 3, 5, 4  # odd sizes; the mlp activation, so g_params has a gradient too
    inputs = [torch.randn(37, d, generator=gen), torch.randn(rank * dbar, d, generator=gen) / math.sqrt(d),
              torch.randn(rank * dbar, generator=gen) * 0.5, torch.randn(3, rank, dbar, h, generator=gen) * 0.5]

    def call(x, w, b, g_params, backend):
        return lrnn_product(x, w, b, rank=rank, dbar=dbar, activation="mlp", g_params=g_params, backend=backend)

    return inputs, call


# (op name, builder(generator) -> (CPU example inputs, call(*inputs, backend)))
CASES: list[tuple[str, Callable]] = [
    ("poly_chain", _poly_chain_case),
    ("poly_ncp", _poly_ncp_case),
    ("causal_linear_attention", _linear_attention_case),
    ("poly_gate", _poly_gate_case),
    ("poly_sa_pool", _poly_sa_pool_case),
    ("poly_sa", _poly_sa_case),
    ("lrnn_product", _lrnn_product_case),
]

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def _rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if torch.isnan(out).any():
        return math.nan
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _run(call, inputs, backend):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = call(*leaves, backend=backend)
    grad = torch.ones_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads


def run_checks(device: str | None = None) -> bool:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 only on a GPU: the Triton interpreter's bf16 dot is wrong (reported unavailable there).
    gpu = device == "cuda"
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if gpu else [torch.float64, torch.float32, torch.float16]
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    header = f"{'op':<25}{'backend':<11}{'dtype':<10}{'forward':>10}{'grads (max)':>13}  result"
    print(header)
    print("-" * len(header))
    all_ok = True
    for op, build in CASES:
        for dtype in dtypes:
            inputs, call = build(torch.Generator().manual_seed(0))
            inputs64 = [t.double() for t in inputs]
            ref_out, ref_grads = _run(call, inputs64, "reference")
            inputs = [t.to(device=device, dtype=dtype) for t in inputs]
            for backend in _backend.BACKENDS:
                why = _backend.unavailable_reason(backend, torch.device(device), dtype)
                name = str(dtype).removeprefix("torch.")
                if why is not None:
                    # A broken triton install is a failure, not a skip: this command is how installs are checked.
                    broken = backend == "triton" and _backend.triton_import_error() is not None
                    all_ok &= not broken
                    print(f"{op:<25}{backend:<11}{name:<10}{'':>10}{'':>13}  {'FAIL' if broken else 'skipped'}: {why}")
                    continue
                try:
                    out, grads = _run(call, inputs, backend)
                    fwd = _rel_err(out, ref_out)
                    bwd = max(_rel_err(g, r) for g, r in zip(grads, ref_grads))
                    ok = fwd < TOLERANCE[dtype] and bwd < TOLERANCE[dtype]
                    print(f"{op:<25}{backend:<11}{name:<10}{fwd:>10.1e}{bwd:>13.1e}  {'PASS' if ok else 'FAIL'}")
                except Exception as exc:  # report and keep checking the others
                    ok = False
                    print(f"{op:<25}{backend:<11}{name:<10}{'':>10}{'':>13}  FAIL: {type(exc).__name__}: {exc}")
                all_ok &= ok
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return all_ok
