"""Auto never runs the reference for a CUDA tensor of a GPU dtype (float32, float16, bfloat16), for any op: on the
inputs of every op's self-check case (`_selfcheck.CASES`, so a new family is covered once it has one) and at and
beyond every size where a fused kernel used to stop; and no backend of auto's table declares a size limit
(`unsupported`), which covers the sizes no test names. A size beyond an op's contract is a ValueError from its checks.

No GPU is needed: each op is called on CPU tensors while `BackendModules.select` is replaced by one that asks the
real selection (`_backend.resolve`, with each backend module's `unsupported`) what auto picks for the same call on a
CUDA device, with the fused backends reported available as on a GPU machine, and stops the call there."""

from __future__ import annotations

import warnings

import pytest
import torch

import hadamard_kernels as hk
from hadamard_kernels import _backend, _selfcheck
from hadamard_kernels.ops._library import BackendModules

FUSED = ("triton", "cuda")


class Chosen(Exception):
    """Raised by the replaced select: the op, the backend auto picked for it on a CUDA device, and the op's
    BackendModules."""

    def __init__(self, op: str, backend: str, modules: BackendModules):
        super().__init__(f"{op}: auto picks {backend!r}")
        self.op, self.backend, self.modules = op, backend, modules


@pytest.fixture
def auto_on_gpu(monkeypatch):
    """Inside, a call of an op raises Chosen with auto's pick for its inputs on a CUDA device."""
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    monkeypatch.setattr(_backend, "_WARNED", set())
    real_reason = _backend.unavailable_reason

    def unavailable_reason(name, device, dtype):
        if device.type == "cuda" and name != "reference" and dtype in _backend.GPU_DTYPES:
            return None  # built and a GPU present: what a GPU machine reports
        return real_reason(name, device, dtype)

    def select(self, backend, like, args=()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the once-per-op warning of a reference pick; the pick is checked
            name = _backend.resolve(self.op, backend, torch.device("cuda"), like.dtype,
                                    supports=lambda candidate: self._unsupported(candidate, args) is None)
        raise Chosen(self.op, name, self)

    monkeypatch.setattr(_backend, "unavailable_reason", unavailable_reason)
    monkeypatch.setattr(BackendModules, "select", select)


def auto_pick(call, inputs) -> Chosen:
    with pytest.raises(Chosen) as info:
        call(*inputs, backend=None)
    return info.value


def cast(inputs, dtype):
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]


# ---------------------------------------------------------------- every op, on its self-check inputs
CASE_OPS = [name for name, _ in _selfcheck.CASES]


def test_every_auto_op_has_a_selfcheck_case():
    """The tests below reach an op through its self-check case, so an op with a row in auto's table needs one."""
    assert set(_backend.AUTO_PREFERENCE) <= set(CASE_OPS), set(_backend.AUTO_PREFERENCE) - set(CASE_OPS)


@pytest.mark.parametrize("dtype", _backend.GPU_DTYPES)
@pytest.mark.parametrize("op, build", _selfcheck.CASES, ids=CASE_OPS)
def test_auto_is_fused_for_every_op(auto_on_gpu, op, build, dtype):
    inputs, call = build(torch.Generator().manual_seed(0))
    chosen = auto_pick(call, cast(inputs, dtype))
    assert chosen.op == op and chosen.backend in FUSED, str(chosen)


# A fused backend in auto's table that declares `unsupported` sends the calls it refuses to the reference on a GPU.
# Allowed: one that refuses only what the op's checks reject first (or a hardware fact, stated here).
ALLOWED = {
    ("causal_linear_attention", "triton"): "refuses Dk, Dv > 256 only, which check_args rejects first (see below)",
}
# Known gaps, to be lifted: the test fails as an unexpected pass once one is, until its entry goes.
KNOWN_GAPS: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("op, build", _selfcheck.CASES, ids=CASE_OPS)
def test_auto_backends_declare_no_size_limit(auto_on_gpu, request, op, build):
    inputs, call = build(torch.Generator().manual_seed(0))
    modules = auto_pick(call, inputs).modules
    limited = [name for name in _backend.AUTO_PREFERENCE.get(op, _backend.DEFAULT_PREFERENCE)
               if name != "reference" and (op, name) not in ALLOWED
               and getattr(modules.module(name), "unsupported", None) is not None]
    gaps = [KNOWN_GAPS[(op, name)] for name in limited if (op, name) in KNOWN_GAPS]
    if gaps:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{op}: {'; '.join(gaps)}"))
    assert not limited, f"{op}: {limited} declare unsupported(): those calls run the reference on a GPU"


# ---------------------------------------------------------------- at and beyond the sizes of former limits
def ncp_call(k, N=2, d=3):
    inputs = [torch.zeros(2, d), torch.zeros(N, k, d), torch.zeros(N, k), torch.zeros(N - 1, k, k),
              torch.zeros(N - 1, k)]
    return inputs, lambda x, aw, ab, sw, sb, backend: hk.poly_ncp(x, aw, ab, sw, sb, backend=backend)


def gate_call(C, spatial):
    shape = (1, 2, 2, C) if spatial else (3, C)
    inputs = [torch.zeros(shape), torch.zeros(shape), *[torch.ones(C)] * 4, torch.ones(1)]
    return inputs, lambda *t, backend: hk.poly_gate(*t, spatial_shift=spatial, backend=backend)


def attention_call(Dk, Dv):
    inputs = [torch.zeros(1, 3, 2, Dk), torch.zeros(1, 3, 2, Dk), torch.zeros(1, 3, 2, Dv)]
    return inputs, lambda q, k, v, backend: hk.causal_linear_attention(q, k, v, backend=backend)


LIMIT_CASES = [
    # poly_ncp: the Triton fast path held k <= 128 on chip, the CUDA one k <= 256.
    *[pytest.param(ncp_call, dict(k=k), id=f"poly_ncp-k{k}") for k in (128, 129, 256, 257, 1024)],
    pytest.param(ncp_call, dict(k=300, N=1), id="poly_ncp-k300-N1"),
    # poly_gate: the Triton kernels held rows of C <= 8192, the CUDA backward C <= 2048.
    *[pytest.param(gate_call, dict(C=C, spatial=spatial), id=f"poly_gate-C{C}-{'spatial' if spatial else 'flat'}")
      for C in (2048, 2049, 8192, 8193) for spatial in (False, True)],
    # causal linear attention: Dk, Dv up to 256 is the op's contract (beyond it, see the test below).
    pytest.param(attention_call, dict(Dk=256, Dv=256), id="linear_attention-256"),
    pytest.param(attention_call, dict(Dk=1, Dv=256), id="linear_attention-1x256"),
]


@pytest.mark.parametrize("dtype", _backend.GPU_DTYPES)
@pytest.mark.parametrize("make, sizes", LIMIT_CASES)
def test_auto_is_fused_at_former_limits(auto_on_gpu, make, sizes, dtype):
    inputs, call = make(**sizes)
    chosen = auto_pick(call, cast(inputs, dtype))
    assert chosen.backend in FUSED, str(chosen)


@pytest.mark.parametrize("Dk, Dv", [(257, 8), (8, 257)])
def test_linear_attention_beyond_contract_is_a_value_error(auto_on_gpu, Dk, Dv):
    inputs, call = attention_call(Dk, Dv)
    with pytest.raises(ValueError, match="must be <= 256"):
        call(*cast(inputs, torch.bfloat16), backend=None)


# ---------------------------------------------------------------- the harness itself
def test_harness_sees_a_reference_pick(auto_on_gpu, monkeypatch):
    """A backend that reports a call unsupported makes auto pick the reference here, as it would on a GPU, so the
    tests above can fail."""
    from hadamard_kernels.ops.poly_ncp import triton as ncp_triton

    monkeypatch.setattr(ncp_triton, "unsupported", lambda *args: "planted limit", raising=False)
    inputs, call = ncp_call(k=129)
    assert auto_pick(call, inputs).backend == "reference"
    # float64 has no fused backend on a GPU.
    inputs, call = ncp_call(k=4)
    assert auto_pick(call, cast(inputs, torch.float64)).backend == "reference"
