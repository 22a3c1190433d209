"""Helpers shared by the test files: tolerances, comparisons that name the tensor, backend lists."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import hadamard_kernels as hk
from hadamard_kernels import _backend

# Relative error ||out - ref|| / ||ref|| against a float64 reference (DESIGN.md). float64 runs only on the
# reference and the Triton interpreter, where it agrees to rounding.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
cuda = pytest.mark.cuda


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, tol=None) -> None:
    """out (any dtype) against ref (float64): same shape, NaN and ±inf exactly where ref has them, relative error of
    the finite entries < tol (the per-dtype target of DESIGN.md for out's dtype, or `dtype`)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    dtype = dtype or out.dtype
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{name}: NaN pattern differs from the reference"
    ref_inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), ref_inf) and torch.equal(out[ref_inf], ref[ref_inf]), (
        f"{name}: inf pattern differs from the reference")
    keep = torch.isfinite(ref)
    tol = tol if tol is not None else REL_TOL[dtype]
    err = rel_err(out[keep], ref[keep])
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e} ({dtype})"


def check_backend_module(backend, reference, inputs, options, grad_out, needs, grad_names, **backward_kwargs):
    """A backend module's forward / backward (what op.py calls, e.g. an emulated cuda.py) against the reference
    module's on float64 copies: the output and every gradient asked for; a gradient not asked for (or of a None
    input) must be None. Returns (output, gradients)."""
    dtype = inputs[0].dtype
    wide = [None if t is None else t.double() for t in inputs]
    out = backend.forward(*inputs, *options)
    assert out.dtype == dtype
    assert_close("output", out, reference.forward(*wide, *options), dtype)
    grads = backend.backward(grad_out, *inputs, *options, list(needs), **backward_kwargs)
    ref_grads = reference.backward(grad_out.double(), *wide, *options, list(needs))
    for name, need, t, grad, ref in zip(grad_names, needs, inputs, grads, ref_grads):
        if need and t is not None:
            assert grad is not None and grad.dtype == t.dtype, f"{name}: missing or {grad.dtype}"
            assert_close(name, grad, ref, dtype)
        else:
            assert grad is None, f"{name} computed but not asked for (or its input is None)"
    return out, grads


def cpu_backends(dtype: torch.dtype = torch.float64) -> list[str]:
    """Backends that run CPU tensors of `dtype` here (triton only under TRITON_INTERPRET=1)."""
    return [b for b, why in hk.available_backends("cpu", dtype).items() if why is None]


def gpu_backends() -> list[str]:
    """Fused backends to check on a GPU; each must be available there (a missing one fails, not skips)."""
    return ["triton", "cuda"]


# ---------------------------------------------------------------- which kernels ran
class LaunchLog:
    """Kernels launched inside `recorded_launches()`: Triton kernel names and hadamard_kernels._C functions."""

    def __init__(self):
        self.triton: list[str] = []
        self.cuda: list[str] = []

    def clear(self):
        self.triton.clear()
        self.cuda.clear()

    def __repr__(self):
        return f"triton kernels {self.triton}, _C calls {self.cuda}"


@contextlib.contextmanager
def recorded_launches():
    """Records every Triton kernel launch (compiled or interpreted) and every call into hadamard_kernels._C."""
    import triton.runtime.jit as triton_jit

    log = LaunchLog()
    restore = []
    kernel_classes = [triton_jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        kernel_classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in kernel_classes:
        def run(self, *args, _original=cls.run, **kwargs):
            log.triton.append(self.fn.__name__)
            return _original(self, *args, **kwargs)
        restore.append((cls, "run", cls.run))
        cls.run = run
    ext, _ = _backend.cuda_extension()
    if ext is not None:
        for name in dir(ext):
            function = getattr(ext, name)
            if name.startswith("_") or isinstance(function, type) or not callable(function):
                continue

            def call(*args, _name=name, _function=function, **kwargs):
                log.cuda.append(_name)
                return _function(*args, **kwargs)
            restore.append((ext, name, function))
            setattr(ext, name, call)
    try:
        yield log
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


def expected_backend(backend: str | None, device) -> str | None:
    """The backend a call with `backend` runs: the argument, else $HADAMARD_KERNELS_BACKEND, else auto, which is
    the reference on the CPU (None: auto on a GPU, decided by the op's preference table)."""
    backend = backend or os.environ.get(_backend.ENV_BACKEND) or None
    if backend is None and torch.device(device).type == "cpu":
        return "reference"
    return backend


def assert_launched(log: LaunchLog, backend: str | None, phase: str, expect_kernels: bool = True) -> None:
    """`backend`'s kernels ran in this phase ("forward"/"backward") and no other backend's did. A reference call,
    or a fused call with `expect_kernels=False` (an empty input), launches nothing."""
    if backend is None:
        return
    if backend == "reference" or not expect_kernels:
        assert not log.triton and not log.cuda, f"{phase}: {backend!r} launched kernels: {log}"
    elif backend == "triton":
        assert log.triton, f"{phase}: backend 'triton' launched no Triton kernel (did it run the reference?)"
        assert not log.cuda, f"{phase}: backend 'triton' called hadamard_kernels._C: {log}"
    elif backend == "cuda":
        tag = "fwd" if phase == "forward" else "bwd"
        assert any(tag in name for name in log.cuda), (
            f"{phase}: backend 'cuda' called no hadamard_kernels._C *{tag}* launcher (the reference instead?): {log}")
        assert not log.triton, f"{phase}: backend 'cuda' launched Triton kernels: {log}"
    else:
        raise AssertionError(f"unknown backend {backend!r}")


def forward_backward(fn, inputs, grads_out=None, *, backend: str | None, expect_kernels: bool = True, seed: int = 7):
    """Runs `outputs = fn(*leaves)` on leaf copies of `inputs` (None stays None; non-float tensors are passed as
    they are) and backpropagates `grads_out` (random when None, one per output). Asserts that the backend the call
    resolves to launched its own kernels in the forward and in the backward (`assert_launched`), so a fused
    backend that quietly runs the reference fails here.

    Returns (outputs tuple, detached; gradients of the inputs, None where an input takes none; grads_out)."""
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    expected = expected_backend(backend, next(t for t in inputs if isinstance(t, torch.Tensor)).device)
    with recorded_launches() as log:
        outputs = fn(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert_launched(log, expected, "forward", expect_kernels)
        log.clear()
        if grads_out is None:
            g = torch.Generator().manual_seed(seed)
            grads_out = tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outputs)
        torch.autograd.backward(outputs, [go.to(o.dtype) for o, go in zip(outputs, grads_out)])
        assert_launched(log, expected, "backward", expect_kernels)
    grads = [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
    return tuple(o.detach() for o in outputs), grads, grads_out


@contextlib.contextmanager
def dispatched_ops():
    """Names of the hadamard_kernels:: custom ops dispatched inside the block (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "hadamard_kernels":
                names.append(func.name().split(".")[0])
            return func(*args, **(kwargs or {}))

    with Recorder():
        yield names


# ---------------------------------------------------------------- CUDA graphs (GPU tests)
def capture_cuda_graph(step):
    """Captures one call of `step` in a CUDA graph after warming it up on a side stream (compiles, autotuning and
    lazy allocations happen outside the capture, as torch.cuda.graphs requires). Returns (graph, the captured call's
    outputs): each `graph.replay()` recomputes them in place from the tensors the step read."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs
