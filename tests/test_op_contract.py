"""The contract every op family keeps, checked once for all of them over `hadamard_kernels._selfcheck.CASES`
(a family joins these tests by adding its case there): the backend asked for (by argument or by
$HADAMARD_KERNELS_BACKEND) is the one whose kernels run, forward and backward; NaN in the backward propagates as in
the reference; torch.autocast casts activations and leaves float64 alone; meta tensors give the output's shape;
its fakes give the real outputs' strides; its gradients are differentiable (double backward); activation
checkpointing recomputes it; torch.compile (Inductor) trains through it, and traces it with dynamic shapes; on a
GPU, the fused backends never synchronise the host, give the same bits twice, run inside a captured CUDA graph,
and run on their tensors' device when another one is current."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from utils import (
    HAS_CUDA,
    assert_close,
    capture_cuda_graph,
    cpu_backends,
    cuda,
    dispatched_ops,
    forward_backward,
    gpu_backends,
    requires_cuda,
)

from hadamard_kernels import _backend, _selfcheck

CASES = dict(_selfcheck.CASES)


def case_inputs(name, dtype=torch.float64):
    inputs, call = CASES[name](torch.Generator().manual_seed(0))
    return [t.to(dtype) for t in inputs], call


def backend_cases(dtype=torch.float64):
    return [(name, backend) for name in CASES for backend in cpu_backends(dtype)]


def check_against_reference(name, inputs, call, backend, grads_out=None, dtype=None):
    """`backend` on `inputs` against the reference on their float64 copies: output and every gradient (the NaN
    pattern included, by assert_close), with the kernels of `backend` asserted to run."""
    outputs, grads, grads_out = forward_backward(lambda *t: call(*t, backend=backend), inputs, grads_out,
                                                 backend=backend)
    ref_outputs, ref_grads, _ = forward_backward(lambda *t: call(*t, backend="reference"),
                                                 [t.double() for t in inputs], [g.double() for g in grads_out],
                                                 backend="reference")
    for i, (out, ref) in enumerate(zip(outputs, ref_outputs)):
        assert_close(f"{name} output {i}", out, ref, dtype)
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert_close(f"{name} grad of input {i}", grad, ref, dtype)


# ---------------------------------------------------------------- which backend ran
@pytest.mark.parametrize("name, backend", backend_cases())
def test_env_var_selects_the_backend(monkeypatch, name, backend):
    """$HADAMARD_KERNELS_BACKEND with backend=None runs that backend's kernels (forward_backward asserts it)."""
    monkeypatch.setenv(_backend.ENV_BACKEND, backend)
    inputs, call = case_inputs(name)
    check_against_reference(name, inputs, call, None, dtype=torch.float64)


@pytest.mark.parametrize("name", CASES)
def test_reference_launches_no_kernel(name):
    inputs, call = case_inputs(name)
    forward_backward(lambda *t: call(*t, backend="reference"), inputs, backend="reference")


@pytest.mark.parametrize("name", CASES)
def test_public_function_dispatches_the_custom_op(name):
    inputs, call = case_inputs(name)
    leaves = [t.clone().requires_grad_() for t in inputs]
    with dispatched_ops() as ops:
        call(*leaves, backend="reference").sum().backward()
    assert any(op.startswith("hadamard_kernels::") and not op.endswith("_backward") for op in ops), ops
    assert any(op.endswith("_backward") for op in ops), f"no backward custom op dispatched: {ops}"


# ---------------------------------------------------------------- NaN in the backward
@pytest.mark.parametrize("name, backend", backend_cases())
def test_nan_in_backward_matches_reference(name, backend):
    """A NaN in the output gradient and one in an input: every gradient has the reference's NaN pattern (a kernel
    that turns NaN into 0, or spreads it too far, fails)."""
    inputs, call = case_inputs(name)
    out = call(*inputs, backend="reference")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad_out.view(-1)[grad_out.numel() // 3] = float("nan")
    check_against_reference(name, inputs, call, backend, grads_out=(grad_out,))
    inputs[0].view(-1)[inputs[0].numel() // 2] = float("nan")
    check_against_reference(name, inputs, call, backend)


# ---------------------------------------------------------------- autocast
def _autocast_dtype(backend):
    # bf16 tl.dot is wrong in the Triton interpreter: fp16 there, bf16 elsewhere.
    return torch.float16 if backend == "triton" else torch.bfloat16


@pytest.mark.parametrize("name, backend", backend_cases(torch.float16))
def test_autocast_after_linear(name, backend):
    """fp32 parameters, activations from an autocast nn.Linear: the op runs in the autocast dtype like nn.Linear,
    and gradients reach every fp32 input in fp32."""
    dtype = _autocast_dtype(backend)
    inputs, call = case_inputs(name, torch.float32)
    torch.manual_seed(0)
    linear = nn.Linear(inputs[0].shape[-1], inputs[0].shape[-1])
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.in_features) + 0.01 * linear.weight)
        linear.bias.zero_()
    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=dtype):
        activation = linear(leaves[0])
        assert activation.dtype == dtype
        out = call(activation, *leaves[1:], backend=backend)
    assert out.dtype == dtype, f"{name}: output {out.dtype} under autocast({dtype})"
    out.float().sum().backward()
    for i, leaf in enumerate([linear.weight, *leaves[1:]]):
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32, f"{name}: input {i} got {leaf.grad}"
        assert torch.isfinite(leaf.grad).all()
    expected = call(linear(inputs[0]), *inputs[1:], backend="reference")
    assert_close(f"{name} under autocast", out.float(), expected.double(), tol=3e-2)


@pytest.mark.parametrize("name", CASES)
def test_autocast_leaves_float64_alone(name):
    inputs, call = case_inputs(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(*inputs, backend="reference")
    assert out.dtype == torch.float64
    assert_close(name, out, call(*inputs, backend="reference"), tol=0.0 + 1e-15)


# ---------------------------------------------------------------- meta tensors
@pytest.mark.parametrize("name", CASES)
def test_meta_tensors_give_the_output_shape(name):
    """DESIGN.md: every op accepts meta tensors (models are built and traced on the meta device)."""
    inputs, call = case_inputs(name, torch.float32)
    expected = call(*inputs, backend="reference")
    out = call(*[t.to("meta") for t in inputs], backend="reference")
    assert out.device.type == "meta" and out.shape == expected.shape and out.dtype == expected.dtype


# ---------------------------------------------------------------- fake implementations
def _column_major(t):
    """t's values with its last two dims stored transposed: dense, but not contiguous (empty_like keeps such
    strides)."""
    return t if t.dim() < 2 else t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "column-major"])
@pytest.mark.parametrize("name, backend", backend_cases())
def test_fake_implementations_give_the_real_strides(name, backend, contiguous):
    """Inductor plans memory from the fake implementations and asserts at run time that every custom op's outputs
    have the sizes and strides its fake gave (a reference backward once handed back a slice of a wider buffer, and
    torch.compile training failed): forward and backward op, on contiguous and on column-major inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace == "hadamard_kernels":
                calls.append((func, args, kwargs or {}, out))
            return out

    inputs, call = case_inputs(name)
    leaves = [(t if contiguous else _column_major(t)).detach().requires_grad_() for t in inputs]
    with Recorder():
        call(*leaves, backend=backend).sum().backward()
    assert len(calls) >= 2, f"{name}: expected the forward and the backward op, got {[c[0] for c in calls]}"
    for func, args, kwargs, real in calls:
        fake_mode = FakeTensorMode()
        with fake_mode:
            fake = func(*[fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
        real, fake = ([t] if isinstance(t, torch.Tensor) else list(t) for t in (real, fake))
        for i, (r, f) in enumerate(zip(real, fake)):
            assert (r.shape, r.stride()) == (f.shape, f.stride()), (
                f"{func} output {i}: real {tuple(r.shape)} strides {r.stride()}, fake {tuple(f.shape)} strides "
                f"{f.stride()}")


# ---------------------------------------------------------------- double backward
@pytest.mark.parametrize("name, backend", backend_cases())
def test_double_backward(name, backend):
    """create_graph=True (gradient penalties, physics-informed losses): the gradients are differentiable, since such
    a backward runs the reference formulas in plain PyTorch; gradgradcheck on the float64 case."""
    inputs, call = case_inputs(name)
    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradgradcheck(lambda *t: call(*t, backend=backend), leaves, fast_mode=True)


@pytest.mark.parametrize("name", CASES)
def test_forward_mode_ad_is_refused(name):
    """Forward-mode AD would pass through a custom op without a tangent, so every JVP downstream would silently miss
    the op's part: a dual input is an error naming it, on any input."""
    import torch.autograd.forward_ad as forward_ad

    inputs, call = case_inputs(name)
    for i in (0, len(inputs) - 1):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(t, torch.ones_like(t)) if j == i else t for j, t in enumerate(inputs)]
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                call(*duals, backend="reference")


# ---------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_activation_checkpointing(name, use_reentrant):
    """torch.utils.checkpoint recomputes the op in the backward: the gradients are those of a plain call. The
    non-reentrant form unpacks saved tensors through hooks that refuse a second read of ctx.saved_tensors (the
    autograd glue once read it twice, and every module failed under it). Backend-independent glue: the reference
    stands for all."""
    from torch.utils.checkpoint import checkpoint

    inputs, call = case_inputs(name)
    plain = lambda *t: call(*t, backend="reference")  # noqa: E731
    outputs, grads, grads_out = forward_backward(
        lambda *t: checkpoint(plain, *t, use_reentrant=use_reentrant), inputs, backend="reference")
    expected, expected_grads, _ = forward_backward(plain, inputs, grads_out, backend="reference")
    assert_close(f"{name} output", outputs[0], expected[0], tol=1e-15)
    for i, (grad, ref) in enumerate(zip(grads, expected_grads)):
        assert_close(f"{name} grad of input {i}", grad, ref, tol=1e-15)


# ---------------------------------------------------------------- torch.compile with dynamic shapes
@pytest.mark.parametrize("name", CASES)
def test_torch_compile_dynamic_shapes(name):
    """torch.compile(dynamic=True) traces sizes, and Python numbers such as a default eps, as symbols: the public
    function, its checks and the fake implementations must take them (math.isfinite of a symbol broke this once).
    Tracing does not depend on the backend, which runs with real values: the reference stands for all."""
    inputs, call = case_inputs(name)
    compiled = torch.compile(lambda *t: call(*t, backend="reference"), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    outputs, grads, grads_out = forward_backward(compiled, inputs, backend="reference")
    expected, expected_grads, _ = forward_backward(lambda *t: call(*t, backend="reference"), inputs, grads_out,
                                                   backend="reference")
    assert_close(f"{name} output", outputs[0], expected[0])
    for i, (grad, ref) in enumerate(zip(grads, expected_grads)):
        assert_close(f"{name} grad of input {i}", grad, ref)


@pytest.mark.parametrize("name", CASES)
def test_torch_compile_inductor_trains(name):
    """Inductor, torch.compile's default backend, around the op, forward and backward: it checks the op's real
    outputs against its fake implementation's strides (the failure test_fake_implementations_give_the_real_strides
    pins down) and runs its own generated code beside the op (here C++ on the CPU)."""
    inputs, call = case_inputs(name, torch.float32)
    plain = lambda *t: call(*t, backend="reference") * 2 + 1  # noqa: E731  (work for Inductor to fuse around it)
    outputs, grads, grads_out = forward_backward(torch.compile(plain, fullgraph=True), inputs, backend="reference")
    expected, expected_grads, _ = forward_backward(plain, inputs, grads_out, backend="reference")
    assert_close(f"{name} output", outputs[0], expected[0].double())
    for i, (grad, ref) in enumerate(zip(grads, expected_grads)):
        assert_close(f"{name} grad of input {i}", grad, ref.double())


# ---------------------------------------------------------------- host syncs and CUDA graphs (GPU)
def gradient_step(call, inputs, backend):
    """`step()` -> (output, gradients of the float inputs) for `call` on `inputs`, whose output gradient is made
    here, once, so the step itself only launches the op's work (no copy from the host)."""
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    floats = [t for t in leaves if t.is_floating_point()]
    grad_out = torch.randn(call(*inputs, backend="reference").shape, generator=torch.Generator().manual_seed(5))
    grad_out = grad_out.to(inputs[0])

    def step():
        out = call(*leaves, backend=backend)
        return (out, *torch.autograd.grad(out, floats, grad_out))

    return step


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", CASES)
def test_fused_backends_never_sync_the_host(name, backend):
    """Forward and backward launch work and return: no host synchronisation (an .item(), a read of a device value,
    a copy from pageable host memory), which would stall the queue every call and make CUDA graph capture fail."""
    inputs, call = case_inputs(name, torch.float32)
    step = gradient_step(call, [t.cuda() for t in inputs], backend)
    step()  # compiles and autotunes (which synchronise) before the checked call
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@cuda
@requires_cuda
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", CASES)
def test_tensors_on_a_device_that_is_not_current(name, backend):
    """Tensors on cuda:1 while cuda:0 is current (a model spread over GPUs in one process): the kernels run on the
    tensors' GPU (Triton would otherwise launch on the current one), forward and backward."""
    inputs, call = case_inputs(name, torch.float32)
    with torch.cuda.device(0):
        check_against_reference(name, [t.to("cuda:1") for t in inputs], call, backend)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", CASES)
def test_fused_backends_are_deterministic(name, backend):
    """No atomics, fixed-order sums: two runs give the same bits, output and every gradient (docs/decisions.md)."""
    inputs, call = case_inputs(name, torch.float32)
    step = gradient_step(call, [t.cuda() for t in inputs], backend)
    first, second = step(), step()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"{name}: output {i} (0: the op's, then gradients) differs between two runs"


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", CASES)
def test_cuda_graph_replays_forward_and_backward(name, backend):
    """The op's forward and backward captured in one CUDA graph (what torch.compile(mode="reduce-overhead") and
    decoding loops do): a replay on new input values gives what an eager call on them gives."""
    inputs, call = case_inputs(name, torch.float32)
    static = [t.cuda() for t in inputs]
    step = gradient_step(call, static, backend)
    graph, captured = capture_cuda_graph(step)
    captured = [t.detach() for t in captured]
    for seed in (1, 2):
        fresh, _ = CASES[name](torch.Generator().manual_seed(seed))
        for target, values in zip(static, fresh):
            target.copy_(values)
        graph.replay()
        expected = step()
        for i, (out, ref) in enumerate(zip(captured, expected)):
            assert_close(f"{name} replay {seed}, output {i} (0: the op's, then gradients)", out, ref.double(),
                         torch.float32)
