"""Machinery every op family shares, so a family's op.py only states what is specific to it.

A family `hadamard_kernels.ops.<family>` has backend modules `reference`, `triton` and `cuda`, each exposing
`forward(*inputs, *options)` and `backward(grad, *inputs, *options, needs)` with the same signatures. Its op.py
defines two torch.library custom ops (the forward and its backward, defined with `backward_custom_op`; both opaque
to the compiler) whose bodies run the module `BackendModules.select` picks, and wires them with
`register_autograd`.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Callable, Sequence

import torch
from torch.autograd import forward_ad

from .. import _backend


class BackendModules:
    """The backend modules of one op family, imported when first selected.

    A backend module may define `unsupported(*inputs, *options) -> str | None`: the reason it cannot run this call
    (a size beyond its kernel's limit, say). Auto then moves on to the next backend; a backend asked for by name
    raises NotImplementedError with that reason."""

    def __init__(self, op: str, package: str):
        self.op = op
        self.package = package

    def module(self, name: str):
        return importlib.import_module(f"{self.package}.{name}")

    def _unsupported(self, name: str, args) -> str | None:
        check = getattr(self.module(name), "unsupported", None)
        return None if check is None else check(*args)

    def select(self, backend: str | None, like: torch.Tensor, args: Sequence = ()):
        """The module that runs this call; `args` are the call's inputs and options, for `unsupported`. For CUDA
        tensors its functions run on `like`'s device (OnDevice)."""
        if any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in (like, *args)):
            # torch.library has no forward-AD formula for these ops: the output would carry no tangent, and every
            # JVP downstream would silently lack this op's part.
            raise NotImplementedError(f"{self.op}: forward-mode AD (torch.autograd.forward_ad dual tensors) is not "
                                      "supported; use reverse mode (torch.autograd.grad, backward)")
        name = _backend.resolve(self.op, backend, like.device, like.dtype,
                                supports=lambda candidate: self._unsupported(candidate, args) is None)
        if (why := self._unsupported(name, args)) is not None:
            raise NotImplementedError(f"{self.op}: backend {name!r} does not support this call: {why}")
        module = self.module(name)
        return OnDevice(module, like.device) if like.device.type == "cuda" else module


class OnDevice:
    """A backend module whose functions run with `device` as the current CUDA device. Triton launches a kernel on the
    current device and the CUDA launchers take its current stream, so without this a call on tensors of cuda:1
    while cuda:0 is current (a model spread over GPUs in one process) would run on the wrong GPU."""

    def __init__(self, module, device: torch.device):
        self.module, self.device = module, device

    def __getattr__(self, name: str):
        value = getattr(self.module, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def on_device(*args, **kwargs):
            with torch.cuda.device(self.device):
                return value(*args, **kwargs)

        return on_device


def autocast_inputs(*args):
    """Under torch.autocast for the inputs' device, the matmul-based ops run in the autocast dtype as nn.Linear does:
    float32/16 tensor arguments are cast to it (gradients flow back to their own dtype through the cast); float64
    is left alone, as autocast leaves it. Outside autocast, returns `args` as they are."""
    like = args[0]
    if not isinstance(like, torch.Tensor):
        return args
    device = like.device.type
    # The meta device (a model built or traced without data) has no autocast. torch.compile before torch 2.13 cannot
    # trace is_autocast_available (fullgraph fails), so a traced call asks is_autocast_enabled only.
    if device == "meta" or (not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device)):
        return args
    if not torch.is_autocast_enabled(device):
        return args
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in args)


def empty_batch_grads(inputs: Sequence[torch.Tensor | None], needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """Gradients for a call with no rows: zeros for the inputs asked for (weights get zero grads, as in nn.Linear)."""
    return [torch.zeros_like(t) if (t is not None and need) else None for t, need in zip(inputs, needs)]


def grads_to_tensors(grads: Sequence[torch.Tensor | None], like: torch.Tensor) -> list[torch.Tensor]:
    """Custom ops cannot return None: a gradient that was not asked for travels as an empty tensor. The others are
    made contiguous, as fake_backward promises (Inductor asserts that real outputs have the fake's strides; a
    backend may hand back a view, e.g. a slice of a wider buffer)."""
    return [like.new_empty(0) if g is None else g.contiguous() for g in grads]


def fake_backward(num_inputs: int, num_grads: int = 1) -> Callable:
    """Fake (meta) implementation for a backward op `(*grads[num_grads], *inputs[num_inputs], *options, needs)`."""

    def fake(*args):
        grads, inputs, needs = args[:num_grads], args[num_grads:num_grads + num_inputs], args[-1]
        # Contiguous whatever the input's strides (grads_to_tensors makes the real ones so).
        return [t.new_empty(t.shape) if (t is not None and need) else grads[0].new_empty(0)
                for t, need in zip(inputs, needs)]

    return fake


_BACKWARD_BODIES: dict = {}  # backward custom op -> (its name, its Python body), from backward_custom_op


def backward_custom_op(name: str) -> Callable:
    """`torch.library.custom_op(name)` for a family's backward op, its body kept for register_autograd: a backward
    that is itself differentiated (create_graph=True) runs that body on the reference backend."""

    def decorate(body):
        op = torch.library.custom_op(name, mutates_args=())(body)
        _BACKWARD_BODIES[op] = (name, body)
        return op

    return decorate


def register_autograd(forward_op, backward_op, num_inputs: int, saved_outputs: Sequence[int] = ()) -> None:
    """Autograd for `forward_op(*inputs[num_inputs], *options)`: saves the inputs (never intermediates) and calls
    `backward_op(*grads, *inputs, *options, needs)` with one gradient per output, which recomputes what it needs.
    The gradient of an extra output (after the first) that is None or empty (an empty placeholder) is passed as
    None. The options end with `backend`. Under create_graph=True (double backward: gradient penalties,
    physics-informed losses) the backward op's body (defined with backward_custom_op) runs with the reference
    backend instead, in plain PyTorch, so autograd differentiates it.

    saved_outputs: indices of outputs that are intermediates the forward was asked to keep (poly_chain's
    projections with save_projections=True), an empty placeholder otherwise. They are not differentiable and get no
    gradient argument; each is saved when not empty (so the graph holds only what was asked for) and passed to
    backward_op after the inputs: `backward_op(*grads, *inputs, *kept, *options, needs)`. Gradients are then not
    materialized (no zeros the size of a kept output): the first output's gradient must be defined unless all are."""

    name, body = _BACKWARD_BODIES[backward_op]  # (a KeyError: define the backward op with backward_custom_op)

    def setup_context(ctx, inputs, output):
        kept = [output[i] for i in saved_outputs]
        if kept:
            ctx.mark_non_differentiable(*kept)
            ctx.set_materialize_grads(False)
        ctx.kept = [t.numel() > 0 for t in kept]
        ctx.save_for_backward(*inputs[:num_inputs], *[t for t in kept if t.numel() > 0])
        ctx.options = inputs[num_inputs:]

    def backward(ctx, *grads):
        needs = list(ctx.needs_input_grad[:num_inputs])
        first, *rest = [g for i, g in enumerate(grads) if i not in saved_outputs]
        if first is None and all(g is None for g in rest):  # zero (undefined) gradients: not materialized
            return (None,) * (num_inputs + len(ctx.options))
        grads = [first.contiguous(), *[g.contiguous() if g is not None and g.numel() > 0 else None for g in rest]]
        saved_tensors = ctx.saved_tensors  # read once: activation checkpointing refuses a second unpack
        inputs, saved = saved_tensors[:num_inputs], iter(saved_tensors[num_inputs:])
        kept = [next(saved) if was_saved else first.new_empty(0) for was_saved in ctx.kept]
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must be differentiable themselves. The backward op's body on the
            # reference backend is plain PyTorch that autograd records; kept projections are left out (they were
            # saved detached, so the reference recomputes them from the inputs, differentiably).
            if first.is_cuda:  # where the fused kernels would have run
                op = name.removesuffix("_backward")
                _backend.warn_once(f"create_graph:{op}", f"{op}: a backward with create_graph=True runs the "
                                   "reference formulas (plain PyTorch, which autograd can differentiate), not the "
                                   "fused kernels, which compute first-order gradients only. Shown once per op.")
            kept = [first.new_empty(0) for _ in kept]
            input_grads = body(*grads, *inputs, *kept, *ctx.options[:-1], "reference", needs)
        else:
            input_grads = backward_op(*grads, *inputs, *kept, *ctx.options, needs)
        return (*[g if need else None for g, need in zip(input_grads, needs)], *[None] * len(ctx.options))

    forward_op.register_autograd(backward, setup_context=setup_context)


def triton_autotune(configs, key):
    """triton.autotune over `configs` on a GPU, where configs[0] is the default. One config only under the
    interpreter (the autotuner's benchmarker needs a GPU): the smallest tiles, since the interpreter's cost grows
    with the block and test shapes are small. configs[0] only when HADAMARD_KERNELS_AUTOTUNE=0 (quick GPU test runs,
    where every constexpr variant would otherwise compile once per config)."""
    import triton

    used = configs
    if _backend.triton_interpreting():
        used = [min(configs, key=lambda c: math.prod(v for v in c.kwargs.values() if type(v) is int))]
    elif os.environ.get("HADAMARD_KERNELS_AUTOTUNE", "1") == "0":
        used = configs[:1]

    def decorate(fn):
        tuner = triton.autotune(configs=used, key=key)(fn)
        tuner.all_configs = list(configs)  # what a GPU autotunes over (tests compile each for sm_90 and sm_80)
        return tuner

    return decorate
