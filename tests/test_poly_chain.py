"""poly_chain: every backend available here against the float64 reference, forward and all gradients."""

from __future__ import annotations

import math

import pytest
import torch
import triton
from utils import HAS_CUDA, assert_close, cpu_backends, cuda, forward_backward, gpu_backends, rel_err, requires_cuda

import hadamard_kernels as hk
from hadamard_kernels import _backend
from hadamard_kernels.ops.poly_chain import reference
from hadamard_kernels.ops.poly_chain.common import ACTIVATIONS, MODES
from hadamard_kernels.ops.poly_chain.op import poly_chain_op


def make_inputs(lead=(3, 13), d=45, k=23, N=3, dtype=torch.float64, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    # Scale the projections so every u_n is O(1) and long chains stay finite.
    weight = torch.randn(N, k, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(N, k, generator=g, dtype=torch.float64) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(weight), cast(b)


def run(x, weight, bias, grad_y=None, **options):
    """Output and (dx, dweight, dbias) of poly_chain on leaf copies of the inputs; asserts that the backend's own
    kernels ran in the forward and in the backward (nothing launches for an empty batch)."""
    (y,), grads, (grad_y,) = forward_backward(lambda *t: hk.poly_chain(*t, **options), [x, weight, bias],
                                              None if grad_y is None else (grad_y,), backend=options.get("backend"),
                                              expect_kernels=x.numel() > 0)
    return y, grads, grad_y


def check_against_reference(x, weight, bias, backend, **options):
    """Runs `backend` on the given inputs and the reference on their float64 copies; compares all outputs."""
    y, grads, grad_y = run(x, weight, bias, backend=backend, **options)
    ref_y, ref_grads, _ = run(*(None if t is None else t.double() for t in (x, weight, bias)), grad_y=grad_y.double(),
                              backend="reference", **options)
    assert_close("y", y, ref_y, x.dtype)
    for name, g, ref_g in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        if ref_g is not None:
            assert_close(name, g, ref_g, x.dtype)


# ---------------------------------------------------------------- the reference is the survey's formula
def survey_loop(x, weight, bias, mode, activation, scale):
    """Brute force: every output element from scalar sums, exactly as the survey writes the recursion."""
    act = {"identity": lambda v: v, "relu": lambda v: max(v, 0.0), "tanh": math.tanh,
           "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
           "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))}[activation]
    N, k, d = weight.shape
    rows = x.reshape(-1, d).tolist()
    out = []
    for row in rows:
        out_row = []
        for j in range(k):
            y = None
            for n in range(N):
                z = sum(row[i] * weight[n, j, i].item() for i in range(d))
                z += bias[n, j].item() if bias is not None else 0.0
                u = scale * act(z)
                y = u if y is None else (u * y + y if mode == "ccp" else u * y)
            out_row.append(y)
        out.append(out_row)
    return torch.tensor(out, dtype=torch.float64).reshape(*x.shape[:-1], k)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_survey_loop(mode, activation):
    x, weight, bias = make_inputs(lead=(2, 3), d=5, k=4, N=3)
    y = hk.poly_chain(x, weight, bias, mode=mode, activation=activation, scale=0.8, backend="reference")
    assert_close("y", y, survey_loop(x, weight, bias, mode, activation, 0.8), tol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_backward_gradcheck(mode, activation):
    x, weight, bias = make_inputs(lead=(4,), d=5, k=3, N=3)
    fn = lambda *t: hk.poly_chain(*t, mode=mode, activation=activation, scale=0.9, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (x, weight, bias)])


# ---------------------------------------------------------------- fused backends on this machine
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(backend, dtype, mode, activation):
    if backend not in cpu_backends(dtype):
        pytest.skip(f"{backend} does not run {dtype} on the CPU")
    x, weight, bias = make_inputs(dtype=dtype)
    check_against_reference(x, weight, bias, backend, mode=mode, activation=activation, scale=0.7)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", [
    dict(lead=(1,), d=1, k=1, N=1),      # smallest
    dict(lead=(70,), d=33, k=17, N=1),   # N = 1: y = u_1
    dict(lead=(2, 2, 3), d=20, k=9, N=16),  # long chain, several leading dims
    dict(lead=(5,), d=130, k=70, N=2),   # d and k past one tile
    dict(lead=(5,), d=6, k=5, N=33),     # N past a power of two: the backward scans pad to 64 degrees
])
@pytest.mark.parametrize("bias", [True, False])
def test_shapes(backend, shape, bias):
    x, weight, b = make_inputs(**shape, bias=bias)
    check_against_reference(x, weight, b, backend, mode="ccp", activation="tanh", scale=0.5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", MODES)
def test_zero_factors_exact_gradients(backend, mode):
    """A factor of exactly 0 (1 + u = 0 in ccp, u = 0 in product): leave-one-out products, not division."""
    x, weight, bias = make_inputs(lead=(9,), d=6, k=5, N=4)
    weight[1] = 0.0
    bias[1] = -1.0 if mode == "ccp" else 0.0  # identity: u_2 = bias -> factor 0
    check_against_reference(x, weight, bias, backend, mode=mode, activation="identity", scale=1.0)
    _, grads, _ = run(x, weight, bias, backend=backend, mode=mode, activation="identity")
    assert grads[1][1].abs().sum() > 0, "dweight of the zero factor must not vanish"
    assert grads[2][1].abs().sum() > 0, "dbias of the zero factor must not vanish"
    assert grads[1][[0, 2, 3]].abs().sum() == 0, "the other factors see the zero: their gradients are exactly 0"


@pytest.mark.parametrize("backend", cpu_backends())
def test_relu_many_zeros_product_mode(backend):
    x, weight, bias = make_inputs(lead=(31,), d=12, k=10, N=5)
    check_against_reference(x, weight, bias, backend, mode="product", activation="relu", scale=math.sqrt(2 / 10))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", MODES)
def test_relu_derivative_at_exact_zero(backend, mode):
    """Pre-activations of exactly 0 (zero weight row and bias): relu'(0) = 0 as in torch, so those units' weights get
    exactly zero gradient."""
    x, weight, bias = make_inputs(lead=(9,), d=6, k=5, N=3)
    weight[1, 2] = 0.0
    bias[1, 2] = 0.0
    check_against_reference(x, weight, bias, backend, mode=mode, activation="relu", scale=0.8)
    _, grads, _ = run(x, weight, bias, backend=backend, mode=mode, activation="relu", scale=0.8)
    assert grads[1][1, 2].abs().sum() == 0 and grads[2][1, 2] == 0, "relu'(0) must be 0"


@pytest.mark.parametrize("backend", cpu_backends(torch.float16))
def test_float16_long_dot_accumulates_in_float32(backend):
    """d = 1024 in float16 with positive terms (no cancellation): a dot accumulated in fp32 is off by the rounding of
    the fp16 output alone; one accumulated in fp16 is ~6x worse, still inside the 5e-3 contract, so the bound here
    is twice the output's own rounding error."""
    x, weight, bias = make_inputs(lead=(24,), d=1024, k=12, N=2, dtype=torch.float16)
    x, weight = x.abs(), weight.abs()
    y = hk.poly_chain(x, weight, bias, backend=backend)
    exact = hk.poly_chain(x.double(), weight.double(), bias.double(), backend="reference")
    assert_close("y", y, exact, tol=2 * rel_err(exact.half(), exact))


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_propagates(backend):
    x, weight, bias = make_inputs(lead=(6,), d=8, k=5, N=2)
    x[2, 3] = float("nan")
    y = hk.poly_chain(x, weight, bias, backend=backend)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4, 5]]).any()


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_inputs(backend):
    """Inputs sliced from wider tensors and a transposed weight view give the contiguous result."""
    x, weight, bias = make_inputs(lead=(11,), d=9, k=6, N=3)
    wide_x = torch.zeros(11, 20, dtype=x.dtype)
    wide_x[:, 3:12] = x
    weight_t = weight.transpose(1, 2).contiguous().transpose(1, 2)
    assert not wide_x[:, 3:12].is_contiguous() and not weight_t.is_contiguous()
    y = hk.poly_chain(wide_x[:, 3:12], weight_t, bias, backend=backend)
    assert_close("y", y, hk.poly_chain(x, weight, bias, backend="reference"))


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_batch(backend):
    x, weight, bias = make_inputs(lead=(0, 4), d=7, k=3, N=2)
    y, grads, _ = run(x, weight, bias, backend=backend)
    assert y.shape == (0, 4, 3)
    assert grads[0].shape == x.shape and grads[1].abs().sum() == 0 and grads[2].abs().sum() == 0


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck(backend):
    x, weight, bias = make_inputs(lead=(4,), d=5, k=3, N=3)
    fn = lambda *t: hk.poly_chain(*t, mode="ccp", activation="gelu", scale=0.9, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (x, weight, bias)])


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    x, weight, bias = make_inputs(lead=(4,), d=5, k=3, N=2)
    for b, save in ((bias, False), (None, False), (bias, True)):
        args = (x.requires_grad_(), weight.requires_grad_(), b, "ccp", "tanh", 0.5, save, backend)
        torch.library.opcheck(poly_chain_op, args)


@pytest.mark.parametrize("save_projections", [False, True])
def test_torch_compile_fullgraph(save_projections):
    x, weight, bias = make_inputs(lead=(8,), d=6, k=4, N=3, dtype=torch.float32)
    fn = lambda *t: hk.poly_chain(*t, activation="relu", scale=0.5,  # noqa: E731
                                  save_projections=save_projections).square().sum()
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled(*leaves).backward()
    expected = [t.clone().requires_grad_() for t in (x, weight, bias)]
    fn(*expected).backward()
    for name, a, b in zip(("dx", "dweight", "dbias"), leaves, expected):
        assert_close(name, a.grad, b.grad.double())


# ---------------------------------------------------------------- save_projections: keep z for the backward
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mode, activation, bias", [("ccp", "gelu", True), ("product", "sigmoid", False)])
def test_save_projections_matches_reference(backend, dtype, mode, activation, bias):
    x, weight, b = make_inputs(lead=(2, 19), d=45, k=23, N=3, dtype=dtype, bias=bias)
    check_against_reference(x, weight, b, backend, mode=mode, activation=activation, scale=0.7,
                            save_projections=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_save_projections_gradcheck(backend):
    """First and second order: the kept projections were saved detached, so a double backward must recompute them
    from the inputs (reading the kept ones would drop their dependence on x and the weights)."""
    x, weight, bias = make_inputs(lead=(4,), d=5, k=3, N=3)
    fn = lambda *t: hk.poly_chain(*t, mode="product", activation="tanh", scale=0.9,  # noqa: E731
                                  save_projections=True, backend=backend)
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (x, weight, bias)])
    assert torch.autograd.gradgradcheck(fn, [x, weight, bias])


def saved_by_autograd(fn, inputs, unpack=lambda t: t):
    """(output, the tensors autograd saved for fn's backward); `unpack` replaces a saved tensor when the backward
    reads it."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = fn(*inputs)
    return y, saved


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("save_projections", [False, True])
def test_save_projections_memory(backend, save_projections):
    """False: autograd keeps the inputs only. True: exactly one tensor more, z [..., N, k] in x's dtype (N*M*k
    elements), and it is the projections x W_n^T + b_n."""
    x, weight, bias = make_inputs(lead=(3, 7), d=9, k=5, N=4, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    _, saved = saved_by_autograd(lambda *t: hk.poly_chain(*t, activation="tanh", save_projections=save_projections,
                                                          backend=backend), leaves)
    inputs = {t.data_ptr() for t in leaves}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert len(saved) == 3 + save_projections and len(extra) == save_projections, [tuple(t.shape) for t in saved]
    if save_projections:
        (z,) = extra
        assert z.shape == (3, 7, 4, 5) and z.dtype == x.dtype
        exact = torch.stack([x.double() @ weight[n].double().T + bias[n].double() for n in range(4)], -2)
        assert_close("saved z", z, exact)
    with torch.no_grad():  # nothing is recorded, so nothing is kept (and z is not computed)
        _, saved = saved_by_autograd(lambda *t: hk.poly_chain(*t, save_projections=True, backend=backend), leaves)
    assert saved == []


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_reads_the_saved_projections(backend):
    """The backward must use the z the forward kept, not recompute it: hand it a different z (through the unpack
    hook) and the gradients must be the ones of that z."""
    x, weight, bias = make_inputs(lead=(6,), d=8, k=5, N=3)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    other = lambda t: t * 0.5 - 0.25 if t.shape == (6, 3, 5) else t  # noqa: E731
    y, _ = saved_by_autograd(lambda *t: hk.poly_chain(*t, activation="gelu", save_projections=True, backend=backend),
                             leaves, unpack=other)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    z = torch.stack([x @ weight[n].T + bias[n] for n in range(3)], -2)
    expected = reference.backward(grad_y, x, weight, bias, "ccp", "gelu", 1.0, [True] * 3, projections=other(z))
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, expected):
        assert_close(name, got, want)


def test_ccp_module_save_projections():
    """hk.nn.CCP(save_projections=True): the same outputs and gradients, and one [B, N, hidden] tensor more kept."""
    torch.manual_seed(0)
    images = torch.randn(5, 1, 4, 4)
    grads, counts = [], []
    for save in (False, True):
        torch.manual_seed(1)
        model = hk.nn.CCP(hidden_size=6, image_size=4, n_degree=3, save_projections=save)
        out, saved = saved_by_autograd(model, [images])
        out.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
        counts.append([tuple(t.shape) for t in saved])
    assert len(counts[1]) == len(counts[0]) + 1 and sorted(set(counts[1]) - set(counts[0])) == [(5, 3, 6)]
    for a, b in zip(*grads):
        assert_close("grad", a, b.double())


def test_save_projections_must_be_a_bool():
    x, weight, bias = make_inputs(lead=(2,), d=3, k=2, N=2)
    with pytest.raises(ValueError, match="save_projections"):
        hk.poly_chain(x, weight, bias, save_projections=1)


def triton_forward_with(config, x, weight, bias, mode, activation, scale):
    """The Triton forward launched with one explicit tile config (autotuning would pick only one per shape)."""
    from hadamard_kernels.ops.poly_chain import triton as triton_backend

    launch = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return triton_backend.forward(x, weight, bias, mode, activation, scale,
                                  kernel=triton_backend._poly_chain_fwd_kernel, **launch)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("N", [2, 3, 5])  # padded to NP = 2, 4, 8 degrees in the grouped path
@pytest.mark.parametrize("mode", MODES)
def test_triton_forward_tile_paths(grouped, N, mode):
    """Both forward paths (degree loop, degrees grouped side by side) with small tiles that leave ragged edges, and
    program orders: 5 row tiles in groups of 2 (the last group of 1) or 8 (one partial group), one or several
    column tiles."""
    config = triton.Config({"BM": 16, "BC": 32 if not grouped else 64, "BD": 16, "GROUPED": grouped,
                            "GROUP_M": 2 if N != 3 else 8})
    x, weight, bias = make_inputs(lead=(67,), d=45, k=23 if N != 5 else 33, N=N)
    y = triton_forward_with(config, x, weight, bias, mode, "tanh", 0.7)
    assert_close("y", y, hk.poly_chain(x, weight, bias, mode=mode, activation="tanh", scale=0.7, backend="reference"))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(x=a["x"][..., :-1]), "x"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), "x"),
    (lambda a: a.update(x=[1.0, 2.0]), "x"),
    (lambda a: a.update(weight=a["weight"][0]), "weight"),
    (lambda a: a.update(weight=a["weight"][:, :0]), "weight.shape[1]"),
    (lambda a: a.update(weight=a["weight"][:0]), "weight.shape[0]"),
    (lambda a: a.update(weight=a["weight"].float()), "weight"),
    (lambda a: a.update(bias=a["bias"][:, 1:]), "bias"),
    (lambda a: a.update(bias=a["bias"].float()), "bias"),
    (lambda a: a.update(mode="ncp"), "mode"),
    (lambda a: a.update(activation="swish"), "activation"),
    (lambda a: a.update(scale=float("inf")), "scale"),
    (lambda a: a.update(scale="1"), "scale"),
    (lambda a: a.update(backend="gpu"), "backend"),
])
def test_bad_input_raises_value_error(change, argument):
    x, weight, bias = make_inputs(lead=(3,), d=4, k=2, N=2)
    args = dict(x=x, weight=weight, bias=bias, mode="ccp", activation="identity", scale=1.0, backend="reference")
    change(args)
    with pytest.raises(ValueError, match=argument.replace("[", r"\[").replace("]", r"\]")):
        hk.poly_chain(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
def test_unavailable_backend_raises_runtime_error():
    x, weight, bias = make_inputs(lead=(3,), d=4, k=2, N=2)
    with pytest.raises(RuntimeError, match="backend 'cuda'.*not available"):
        hk.poly_chain(x, weight, bias, backend="cuda")


# ---------------------------------------------------------------- GPU
# Every activation in bf16, and each dtype in both modes, with and without bias: every kernel variant compiles on
# first use, so the GPU matrix is a cover of the options rather than their full product.
GPU_CASES = [(torch.bfloat16, "ccp", act, True) for act in ACTIVATIONS] + [
    (dtype, mode, act, bias)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for mode, act, bias in (("ccp", "gelu", False), ("product", "relu", True), ("product", "sigmoid", False))
]


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype, mode, activation, bias", GPU_CASES)
def test_gpu_matches_reference(backend, dtype, mode, activation, bias):
    x, weight, b = make_inputs(lead=(3, 37), d=45, k=23, N=5, dtype=dtype, device="cuda", bias=bias)
    check_against_reference(x, weight, b, backend, mode=mode, activation=activation, scale=0.7)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    dict(lead=(1,), d=1, k=1, N=1), dict(lead=(1000,), d=257, k=129, N=16),
    dict(lead=(4, 512), d=512, k=512, N=3), dict(lead=(3,), d=8, k=300, N=2),
])
def test_gpu_shapes(backend, dtype, shape):
    x, weight, b = make_inputs(**shape, dtype=dtype, device="cuda")
    check_against_reference(x, weight, b, backend, mode="ccp", activation="tanh", scale=0.5)


HOPPER = _backend.is_hopper()


@cuda
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (H100, H200)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    pytest.param(dict(lead=(1,), d=1, k=1, N=1), id="one"),
    pytest.param(dict(lead=(1000,), d=257, k=129, N=16), id="odd"),  # odd d: synchronous loads
    pytest.param(dict(lead=(4, 512), d=512, k=512, N=3), id="aligned"),
    pytest.param(dict(lead=(3,), d=8, k=300, N=2), id="wide"),
    pytest.param(dict(lead=(300,), d=200, k=70, N=40), id="passes"),  # 2 passes of 20 degrees, d ragged
    pytest.param(dict(lead=(2048,), d=1024, k=256, N=4), id="deep"),
    pytest.param(dict(lead=(16384,), d=256, k=512, N=3), id="persistent"),  # 896 tiles: several per block
])
def test_gpu_wgmma_forward(monkeypatch, dtype, shape):
    """The cuda backend's Hopper forward (opt-in: HADAMARD_KERNELS_CUDA_WGMMA=1), forward and backward."""
    from hadamard_kernels.ops.poly_chain import cuda as chain_cuda

    monkeypatch.setenv(_backend.ENV_CUDA_WGMMA, "1")
    ext, launches = chain_cuda.require_cuda_extension(), []
    launch = ext.poly_chain_fwd
    monkeypatch.setattr(ext, "poly_chain_fwd", lambda params, stream: (launches.append(params.wgmma),
                                                                         launch(params, stream)))
    x, weight, b = make_inputs(**shape, dtype=dtype, device="cuda")
    check_against_reference(x, weight, b, "cuda", mode="ccp", activation="tanh", scale=0.5)
    assert launches and all(launches), f"forward launches with params.wgmma: {launches}"


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("mode", MODES)
def test_gpu_zero_factors(backend, mode):
    x, weight, bias = make_inputs(lead=(99,), d=40, k=33, N=4, dtype=torch.float32, device="cuda")
    weight[1] = 0.0
    bias[1] = -1.0 if mode == "ccp" else 0.0
    check_against_reference(x, weight, bias, backend, mode=mode, activation="identity", scale=1.0)


@cuda
@requires_cuda
@pytest.mark.parametrize("N", [3])  # NP = 4: padded degrees; each config compiles once
def test_gpu_triton_every_forward_config(N):
    """Tests run with one config; the benchmarks autotune over all of them, so each must be right."""
    from hadamard_kernels.ops.poly_chain import triton as triton_backend

    x, weight, bias = make_inputs(lead=(300,), d=200, k=70, N=N, dtype=torch.bfloat16, device="cuda")
    ref = hk.poly_chain(x.double(), weight.double(), bias.double(), mode="ccp", activation="gelu", scale=0.5)
    for config in triton_backend._LOOP_CONFIGS + triton_backend._GROUPED_CONFIGS:
        if config.kwargs["GROUPED"] and triton.next_power_of_2(N) > triton_backend._MAX_GROUPED_NP:
            continue
        y = triton_forward_with(config, x, weight, bias, "ccp", "gelu", 0.5)
        assert_close(f"y with {config}", y, ref)


@cuda
@requires_cuda
def test_gpu_auto_backend_and_compile():
    x, weight, bias = make_inputs(lead=(64,), d=32, k=16, N=3, dtype=torch.bfloat16, device="cuda")
    fn = torch.compile(lambda *t: hk.poly_chain(*t, activation="gelu"), fullgraph=True)
    assert_close("y", fn(x, weight, bias), hk.poly_chain(x.double(), weight.double(), bias.double(), activation="gelu"))
