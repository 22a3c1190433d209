"""lrnn_product: the reference against naive forms, every backend available here against the float64 reference
(forward and every gradient, g_params included), edge cases, bad input, the modules' initialisation, and GPU runs."""

from __future__ import annotations

import math

import pytest
import torch
from utils import HAS_CUDA, assert_close, cpu_backends, cuda, forward_backward, gpu_backends, rel_err, requires_cuda

import hadamard_kernels as hk
from hadamard_kernels.ops.lrnn import common as lrnn_common
from hadamard_kernels.ops.lrnn import reference as lrnn_reference
from hadamard_kernels.ops.lrnn import triton as lrnn_triton
from hadamard_kernels.ops.lrnn.common import ACTIVATIONS
from hadamard_kernels.ops.lrnn.op import lrnn_product_op

needs_interpreter = pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")


def make_inputs(lead=(37,), d=5, rank=7, dbar=3, h=3, activation="spder", dtype=torch.float64, device="cpu",
                bias=True, seed=0):
    """x, weight, bias, g_params (None unless mlp) with z of unit order, so every factor is O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    weight = torch.randn(rank * dbar, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(rank * dbar, generator=g, dtype=torch.float64) * 0.5 if bias else None
    gp = torch.randn(3, rank, dbar, h, generator=g, dtype=torch.float64) * 0.5 if activation == "mlp" else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(weight), cast(b), cast(gp)


def options(rank=7, dbar=3, activation="spder", **extra):
    return dict(rank=rank, dbar=dbar, activation=activation, omega=1.5 if activation == "sin" else 1.0, **extra)


def run(inputs, grad_phi=None, **opts):
    """Output and (dx, dweight, dbias, dg_params) on leaf copies of the inputs; asserts that the backend's own kernels
    ran in the forward and in the backward (nothing launches for an empty batch)."""
    (phi,), grads, (grad_phi,) = forward_backward(
        lambda x, w, b, gp: hk.lrnn_product(x, w, b, g_params=gp, **opts), inputs,
        None if grad_phi is None else (grad_phi,), backend=opts.get("backend"), expect_kernels=inputs[0].numel() > 0)
    return phi, grads, grad_phi


def check_against_reference(inputs, backend, **opts):
    """`backend` on `inputs` against the reference on their float64 copies: phi and every gradient."""
    phi, grads, grad_phi = run(inputs, backend=backend, **opts)
    ref_phi, ref_grads, _ = run([None if t is None else t.double() for t in inputs], grad_phi.double(),
                                backend="reference", **opts)
    dtype = inputs[0].dtype
    assert_close("phi", phi, ref_phi, dtype)
    for name, g, ref in zip(("dx", "dweight", "dbias", "dg_params"), grads, ref_grads):
        if ref is not None:
            assert_close(name, g, ref, dtype)
    return phi, grads


# ---------------------------------------------------------------- the reference is the paper's formula
_SCALAR_G = {
    "sin": lambda z, omega: math.sin(omega * z),
    "spder": lambda z, omega: math.sin(z) * math.sqrt(abs(z)),
    "arctan": lambda z, omega: math.atan(z),
    "tanh": lambda z, omega: math.tanh(z),
}


def naive_loops(x, weight, bias, g_params, rank, dbar, activation, omega, gamma):
    """Every phi_l from scalar sums and products, the paper's formula element by element."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in rows:
        out_row = []
        for l_ in range(rank):
            phi = 1.0
            for j in range(dbar):
                c = l_ * dbar + j
                z = sum(v * weight[c, i].item() for i, v in enumerate(row)) + (bias[c].item() if bias is not None
                                                                                else 0.0)
                if activation == "mlp":
                    a, w, b = (g_params[k, l_, j].tolist() for k in range(3))
                    g = sum(a_i * math.tanh(w_i * z + b_i) for a_i, w_i, b_i in zip(a, w, b))
                else:
                    g = _SCALAR_G[activation](z, omega)
                phi *= 1 + gamma * g
            out_row.append(phi)
        out.append(out_row)
    return torch.tensor(out, dtype=torch.float64).reshape(*x.shape[:-1], rank)


def plain_formula(x, weight, bias, g_params, rank, dbar, activation, omega, gamma):
    """The formula in differentiable torch ops (for autograd): a second form of the reference's backward."""
    z = x @ weight.T + (bias if bias is not None else 0)
    z = z.unflatten(-1, (rank, dbar))
    if activation == "mlp":
        a, w, c = g_params
        g = (a * torch.tanh(w * z[..., None] + c)).sum(-1)
    else:
        g = {"sin": lambda: torch.sin(omega * z), "spder": lambda: torch.sin(z) * torch.sqrt(torch.abs(z)),
             "arctan": lambda: torch.atan(z), "tanh": lambda: torch.tanh(z)}[activation]()
    return torch.prod(1 + gamma * g, -1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_naive_loops(activation):
    x, weight, bias, gp = make_inputs(lead=(2, 3), d=4, rank=3, dbar=4, h=2, activation=activation)
    opts = options(3, 4, activation)
    phi = hk.lrnn_product(x, weight, bias, g_params=gp, gamma=0.7, backend="reference", **opts)
    assert_close("phi", phi, naive_loops(x, weight, bias, gp, gamma=0.7, **opts), tol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_backward_matches_autograd_of_the_formula(activation):
    inputs = make_inputs(lead=(5, 2), d=4, rank=3, dbar=5, h=3, activation=activation)
    opts = options(3, 5, activation)
    _, grads, grad_phi = run(inputs, backend="reference", **opts)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    plain_formula(*leaves, gamma=5 ** -0.5, **opts).backward(grad_phi)
    for name, g, leaf in zip(("dx", "dweight", "dbias", "dg_params"), grads, leaves):
        if leaf is not None:
            assert_close(name, g, leaf.grad, tol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dbar_1_is_an_mlp_with_activation_g(backend, activation):
    """dbar = 1: phi = 1 + gamma * g(x W^T + b), gamma = 1, a plain one-layer network."""
    inputs = make_inputs(lead=(11,), d=6, rank=5, dbar=1, h=2, activation=activation)
    opts = options(5, 1, activation)
    phi, grads, grad_phi = run(inputs, backend=backend, **opts)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    x, weight, bias, gp = leaves
    z = torch.nn.functional.linear(x, weight, bias)
    g = (gp[0, :, 0] * torch.tanh(gp[1, :, 0] * z[..., None] + gp[2, :, 0])).sum(-1) if activation == "mlp" else {
        "sin": lambda: torch.sin(1.5 * z), "spder": lambda: torch.sin(z) * torch.sqrt(z.abs()),
        "arctan": lambda: torch.atan(z), "tanh": lambda: torch.tanh(z)}[activation]()
    expected = 1 + g
    expected.backward(grad_phi)
    assert_close("phi", phi, expected.detach())
    for name, got, leaf in zip(("dx", "dweight", "dbias", "dg_params"), grads, leaves):
        if leaf is not None:
            assert_close(name, got, leaf.grad)


# ---------------------------------------------------------------- every backend against the reference
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(backend, dtype, activation):
    if backend not in cpu_backends(dtype):
        pytest.skip(f"{backend} does not run {dtype} on the CPU")
    check_against_reference(make_inputs(activation=activation, dtype=dtype), backend, **options(activation=activation))


SHAPES = [
    dict(lead=(1,), d=1, rank=1, dbar=1, activation="tanh"),  # smallest
    dict(lead=(37,), d=1, rank=7, dbar=3, activation="sin"),  # d = 1 (audio: time)
    dict(lead=(2, 19), d=2, rank=5, dbar=8, activation="spder", bias=False),  # d = 2 (image coordinates), no bias
    dict(lead=(2, 3, 4), d=20, rank=6, dbar=1, activation="arctan"),  # several leading dims, dbar = 1
    dict(lead=(9,), d=2, rank=3, dbar=33, activation="mlp", bias=False),  # dbar past a power of two: 64 components
    dict(lead=(5,), d=70, rank=2, dbar=64, activation="tanh"),  # the largest dbar, d past a 64-chunk
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lead{s['lead']}-d{s['d']}-r{s['rank']}-dbar{s['dbar']}")
def test_shapes(backend, shape):
    shape = dict(shape)
    bias = shape.pop("bias", True)
    check_against_reference(make_inputs(**shape, bias=bias), backend,
                            **options(shape["rank"], shape["dbar"], shape["activation"]))


@needs_interpreter
@pytest.mark.parametrize("dtype, activation", [(torch.float64, "mlp"), (torch.float32, "sin"),
                                               (torch.float16, "spder")])
def test_triton_backward_in_chunks(monkeypatch, dtype, activation):
    """The backward's grad_z in several chunks of rows (ragged last chunk), dweight and dbias summed across them."""
    inputs = make_inputs(lead=(300,), d=3, rank=3, dbar=2, h=2, activation=activation, dtype=dtype)
    monkeypatch.setattr(lrnn_common, "CHUNK_BYTES", 64 * 3 * 2 * inputs[0].element_size())  # 64 rows per chunk
    check_against_reference(inputs, "triton", **options(3, 2, activation))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("activation", ["spder", "mlp"])
def test_gradcheck(backend, activation):
    inputs = make_inputs(lead=(3,), d=2, rank=2, dbar=3, h=2, activation=activation)
    opts = options(2, 3, activation)
    fn = lambda x, w, b, gp: hk.lrnn_product(x, w, b, g_params=gp, backend=backend, **opts)  # noqa: E731
    leaves = [None if t is None else t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=backend != "reference")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_double_backward(activation):
    """A physics-informed loss on an LRNN's derivatives (du/dx in the loss) differentiates the backward: every
    activation's second derivatives by gradgradcheck (that path runs the reference backward, whatever the
    forward's backend: tests/test_op_contract.py)."""
    inputs = make_inputs(lead=(3,), d=2, rank=2, dbar=3, h=2, activation=activation)
    opts = options(2, 3, activation)
    fn = lambda x, w, b, gp: hk.lrnn_product(x, w, b, g_params=gp, backend="reference", **opts)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, [None if t is None else t.requires_grad_() for t in inputs])


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    for activation, bias in (("mlp", True), ("sin", False)):
        x, weight, b, gp = make_inputs(lead=(4,), d=3, rank=2, dbar=3, h=2, activation=activation, bias=bias)
        args = (x.requires_grad_(), weight.requires_grad_(), b, gp, 2, 3, activation, 1.0, 0.5, backend)
        torch.library.opcheck(lrnn_product_op, args)


def test_torch_compile_fullgraph():
    inputs = make_inputs(lead=(8,), d=3, rank=4, dbar=3, h=2, activation="mlp", dtype=torch.float32)
    fn = lambda x, w, b, gp: hk.lrnn_product(x, w, b, g_params=gp, rank=4, dbar=3,  # noqa: E731
                                             activation="mlp").square().sum()
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves).backward()
    expected = [t.clone().requires_grad_() for t in inputs]
    fn(*expected).backward()
    for name, a, b in zip(("dx", "dweight", "dbias", "dg_params"), leaves, expected):
        assert_close(name, a.grad, b.grad.double())


# ---------------------------------------------------------------- exact zeros, NaN, overflow
@pytest.mark.parametrize("backend", cpu_backends())
def test_zero_factor_sin_exact_gradients(backend):
    """gamma = 1 and z = -pi/2 (a zero weight row): the factor 1 + sin(z) is exactly 0, so phi is 0 and the other
    components of that neuron get exactly zero gradient, while the zero factor's own gradient is the product of the
    others (prefix * suffix products; a division by the factor would give NaN)."""
    x, weight, bias, _ = make_inputs(lead=(9,), d=4, rank=3, dbar=4, activation="sin")
    weight[5] = 0.0  # neuron 1, component 1
    bias[5] = -math.pi / 2
    opts = dict(rank=3, dbar=4, activation="sin", gamma=1.0)
    phi, grads = check_against_reference([x, weight, bias, None], backend, **opts)
    assert (phi[:, 1] == 0).all() and (phi[:, [0, 2]] != 0).all()
    dweight, dbias = grads[1], grads[2]
    assert torch.isfinite(dweight).all() and torch.isfinite(dbias).all()
    assert (dweight[[4, 6, 7]] == 0).all() and (dbias[[4, 6, 7]] == 0).all(), "the zero factor zeroes the others"
    assert dweight[[0, 1, 2, 3, 8, 9, 10, 11]].abs().sum() > 0


@pytest.mark.parametrize("backend", cpu_backends())
def test_zero_factor_mlp_exact_gradients(backend):
    """mlp with a saturated tanh: g = a tanh(w z + 50) = a exactly, a = -2 and gamma = 0.5 give the factor 0. The
    gradient of that component's a is the product of the other factors (finite, nonzero); its z-gradient is 0
    (tanh' = 0), and the neuron's other components get exactly zero gradient."""
    x, weight, bias, gp = make_inputs(lead=(9,), d=4, rank=3, dbar=4, h=2, activation="mlp")
    gp[:, 2, 3] = torch.tensor([[-2.0, 0.0], [0.1, 0.0], [50.0, 0.0]])  # neuron 2, component 3: a, w, c per unit
    opts = dict(rank=3, dbar=4, activation="mlp", gamma=0.5)
    phi, grads = check_against_reference([x, weight, bias, gp], backend, **opts)
    assert (phi[:, 2] == 0).all()
    dgp = grads[3]
    assert torch.isfinite(dgp).all()
    assert (dgp[0, 2, 3, 0] != 0) and (dgp[:, 2, :3] == 0).all(), "zero factor: only its own a gets a gradient"
    assert (grads[1][8:12] == 0).all(), "neuron 2's weight rows get no gradient"


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_propagates(backend):
    x, weight, bias, _ = make_inputs(lead=(6,), d=5, rank=4, dbar=3)
    x[2, 3] = float("nan")
    weight[7, 0] = float("nan")  # neuron 2
    phi = hk.lrnn_product(x, weight, bias, backend=backend, **options(4, 3))
    expected = torch.zeros_like(phi, dtype=torch.bool)
    expected[2] = True
    expected[:, 2] = True
    assert torch.equal(torch.isnan(phi), expected)


@pytest.mark.parametrize("backend", cpu_backends())
def test_spder_at_exactly_zero(backend):
    """z = 0 (a zero weight row and bias): g(0) = 0 and g'(0) = 0 (the limit of sqrt|z| (cos z + sinc(z) / 2)), so
    that row's weight and bias get exactly zero, finite gradients."""
    x, weight, bias, _ = make_inputs(lead=(9,), d=4, rank=3, dbar=4, activation="spder")
    weight[6] = 0.0
    bias[6] = 0.0
    _, grads = check_against_reference([x, weight, bias, None], backend, **options(3, 4, "spder"))
    assert (grads[1][6] == 0).all() and grads[2][6] == 0
    assert torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()


@pytest.mark.parametrize("backend", cpu_backends(torch.float16))
def test_float16_long_product_does_not_overflow(backend):
    """dbar = 64, gamma = 1: 32 factors of 2 (sin = 1) then 32 of 0.5 (sin = -1/2). phi = 1, but the running
    product reaches 2^32, past fp16's range: the products must be taken in fp32."""
    x = torch.randn(5, 3, dtype=torch.float16)
    weight = torch.zeros(2 * 64, 3, dtype=torch.float16)
    bias = torch.tensor(([math.pi / 2] * 32 + [-math.pi / 6] * 32) * 2, dtype=torch.float16)
    opts = dict(rank=2, dbar=64, activation="sin", gamma=1.0)
    factors = (1 + torch.sin(bias.float())).half()
    assert torch.isinf(torch.cumprod(factors, 0)).any(), "the test needs a running product past fp16's range"
    phi, grads = check_against_reference([x, weight, bias, None], backend, **opts)
    assert torch.isfinite(phi).all() and ((phi - 1).abs() < 0.05).all()
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("backend", cpu_backends(torch.float16))
def test_float16_dbar_64(backend):
    check_against_reference(make_inputs(lead=(13,), d=7, rank=3, dbar=64, dtype=torch.float16), backend,
                            **options(3, 64, "spder"))


@pytest.mark.parametrize("backend", cpu_backends(torch.float16))
def test_float16_long_dot_accumulates_in_float32(backend):
    """d = 1024 in float16 with positive terms (no cancellation), dbar = 1 and gamma = 1: phi = 1 + sin(4 z) with
    z = O(1) is off by the rounding of the fp16 output alone when the dot accumulates in fp32; an fp16 accumulator
    (its error amplified by omega = 4) is several times worse. The bound is twice the output's own rounding error."""
    x, weight, bias, _ = make_inputs(lead=(24,), d=1024, rank=12, dbar=1, dtype=torch.float16)
    x, weight = x.abs(), weight.abs() / 32
    opts = dict(rank=12, dbar=1, activation="sin", omega=4.0, gamma=1.0)
    phi = hk.lrnn_product(x, weight, bias, backend=backend, **opts)
    exact = hk.lrnn_product(x.double(), weight.double(), bias.double(), backend="reference", **opts)
    assert_close("phi", phi, exact, tol=2 * rel_err(exact.half(), exact))


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_batch(backend):
    inputs = make_inputs(lead=(0, 4), d=3, rank=2, dbar=3, h=2, activation="mlp")
    phi, grads, _ = run(inputs, backend=backend, **options(2, 3, "mlp"))
    assert phi.shape == (0, 4, 2)
    assert grads[0].shape == (0, 4, 3) and all((g == 0).all() for g in grads[1:])


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_inputs(backend):
    x, weight, bias, _ = make_inputs(lead=(11,), d=6, rank=3, dbar=2)
    wide_x = torch.zeros(11, 20, dtype=x.dtype)
    wide_x[:, 3:9] = x
    weight_t = weight.T.contiguous().T
    assert not wide_x[:, 3:9].is_contiguous() and not weight_t.is_contiguous()
    phi = hk.lrnn_product(wide_x[:, 3:9], weight_t, bias, backend=backend, **options(3, 2))
    assert_close("phi", phi, hk.lrnn_product(x, weight, bias, backend="reference", **options(3, 2)))


@needs_interpreter
@pytest.mark.parametrize("dbar", [1, 3, 8])
def test_triton_tile_configs(dbar):
    """Forward and grad_z kernels with explicit small tiles (autotuning picks one per shape): BN below and above
    the padded dbar, ragged row and neuron blocks."""
    x, weight, bias, gp = make_inputs(lead=(37,), d=20, rank=3, dbar=dbar, h=2, activation="mlp")
    args = (x, weight, bias, gp, 3, dbar, "mlp", 1.0, dbar ** -0.5)
    ref = lrnn_reference
    grad_phi = torch.randn(37, 3, dtype=torch.float64)
    expected = ref.backward(grad_phi, *args, [True] * 4)
    for bn in (16, 32):
        config = dict(BM=16, BN=bn, BD=16)
        assert_close(f"phi {config}", lrnn_triton.forward(*args, kernel=lrnn_triton._lrnn_fwd_kernel, **config),
                     ref.forward(*args))
        grads = lrnn_triton.backward(grad_phi, *args, [True] * 4, kernel=lrnn_triton._lrnn_grad_z_kernel, **config)
        for name, g, e in zip(("dx", "dweight", "dbias", "dg_params"), grads, expected):
            assert_close(f"{name} {config}", g, e)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(x=a["x"][..., :-1]), "x"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), "x"),
    (lambda a: a.update(x=[1.0, 2.0]), "x"),
    (lambda a: a.update(weight=a["weight"][:-1]), "weight"),  # rows != rank * dbar
    (lambda a: a.update(weight=a["weight"][None]), "weight"),
    (lambda a: a.update(weight=a["weight"].float()), "weight"),
    (lambda a: a.update(weight=a["weight"].to("meta")), "weight"),  # another device
    (lambda a: a.update(bias=a["bias"][1:]), "bias"),
    (lambda a: a.update(bias=a["bias"].float()), "bias"),
    (lambda a: a.update(g_params=None), "g_params"),  # mlp needs them
    (lambda a: a.update(g_params=a["g_params"][:, :, :-1]), "g_params"),
    (lambda a: a.update(g_params=a["g_params"][:2]), "g_params"),
    (lambda a: a.update(g_params=torch.zeros(3, 2, 3, 17, dtype=torch.float64)), r"g_params.shape\[3\]"),
    (lambda a: a.update(g_params=a["g_params"].float()), "g_params"),
    (lambda a: a.update(activation="sin"), "g_params"),  # g_params given for another activation
    (lambda a: a.update(activation="relu", g_params=None), "activation"),
    (lambda a: a.update(rank=0), "rank"),
    (lambda a: a.update(dbar=0), "dbar"),
    (lambda a: a.update(dbar=65), "dbar"),  # the contract: 1 <= dbar <= 64
    (lambda a: a.update(rank=2.0), "rank"),
    (lambda a: a.update(dbar=True), "dbar"),
    (lambda a: a.update(omega=2.0), "omega"),  # omega is sin's
    (lambda a: a.update(activation="sin", g_params=None, omega=float("nan")), "omega"),
    (lambda a: a.update(gamma=float("inf")), "gamma"),
    (lambda a: a.update(backend="gpu"), "backend"),
])
def test_bad_input_raises_value_error(change, argument):
    x, weight, bias, gp = make_inputs(lead=(3,), d=4, rank=2, dbar=3, h=2, activation="mlp")
    args = dict(x=x, weight=weight, bias=bias, g_params=gp, rank=2, dbar=3, activation="mlp", backend="reference")
    change(args)
    with pytest.raises(ValueError, match=argument):
        hk.lrnn_product(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


def test_op_body_checks_direct_calls():
    x, weight, bias, _ = make_inputs(lead=(3,), d=4, rank=2, dbar=3)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.hadamard_kernels.lrnn_product(x, weight[:-1], bias, None, 2, 3, "spder", 1.0, 0.5, "reference")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
def test_unavailable_backend_raises_runtime_error():
    x, weight, bias, _ = make_inputs(lead=(3,), d=4, rank=2, dbar=3)
    with pytest.raises(RuntimeError, match="backend 'cuda'.*not available"):
        hk.lrnn_product(x, weight, bias, backend="cuda", **options(2, 3))


# ---------------------------------------------------------------- modules
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layer_norm", [True, False])
def test_deep_lrnn_activations_stay_bounded_at_init(activation, layer_norm):
    """8 layers at init (the module's initialisation, gamma = dbar^-1/2): every layer's phi has mean 1 and variance
    at most e - 1 (std <= 1.31), as the module docstring derives; the bound holds without LayerNorm too."""
    torch.manual_seed(0)
    model = hk.nn.LRNN(16, [32] * 8, 3, dbar=8, activation=activation, omega=30.0 if activation == "sin" else 1.0,
                       layer_norm=layer_norm, backend="reference")
    h = torch.randn(512, 16)
    with torch.no_grad():
        for i, (layer, norm) in enumerate(zip(model.layers, model.norms)):
            phi = layer(h)
            assert abs(phi.mean().item() - 1) < 0.35 and 0.2 < phi.std().item() < math.sqrt(math.e - 1), (
                f"layer {i}: mean {phi.mean().item():.3f}, std {phi.std().item():.3f}")
            h = norm(phi)
        out = model.S_out(h)
    assert 0.05 < out.std().item() < 2


def test_modules_shapes_and_parameters():
    layer = hk.nn.LRNNLayer(5, 4, 3, activation="mlp", hidden=6)
    assert layer.weight.shape == (12, 5) and layer.bias.shape == (12,) and layer.g_params.shape == (3, 4, 3, 6)
    assert layer(torch.randn(2, 7, 5)).shape == (2, 7, 4)
    assert hk.nn.LRNNLayer(5, 4, 3, bias=False).bias is None
    shallow = hk.nn.LRNN(2, [8], 3, dbar=4, layer_norm=False)
    assert isinstance(shallow.norms[0], torch.nn.Identity) and shallow(torch.randn(10, 2)).shape == (10, 3)
    deep = hk.nn.LRNN(2, [8, 6, 5], 3, dbar=4, activation="spder")
    assert [n.normalized_shape for n in deep.norms] == [(8,), (6,), (5,)] and deep.S_out.in_features == 5


@pytest.mark.parametrize("make, argument", [
    (lambda: hk.nn.LRNNLayer(5, 4, 3, activation="relu"), "activation"),
    (lambda: hk.nn.LRNNLayer(5, 4, 3, activation="tanh", omega=2.0), "omega"),
    (lambda: hk.nn.LRNNLayer(5, 4, 3, omega=0.0), "omega"),
    (lambda: hk.nn.LRNNLayer(5, 4, 3, activation="mlp", hidden=17), "hidden"),
    (lambda: hk.nn.LRNNLayer(5, 4, 3, hidden=4), "hidden"),
    (lambda: hk.nn.LRNNLayer(5, 0, 3), "rank"),
    (lambda: hk.nn.LRNNLayer(5, 4, 0), "dbar"),
    (lambda: hk.nn.LRNN(5, [], 3, dbar=2), "hidden_ranks"),
    (lambda: hk.nn.LRNN(5, [4], 0, dbar=2), "out_features"),
])
def test_module_bad_arguments(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


# ---------------------------------------------------------------- GPU
@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_matches_reference(backend, dtype, activation):
    inputs = make_inputs(lead=(3, 337), d=45, rank=37, dbar=8, h=5, activation=activation, dtype=dtype,
                         device="cuda")
    check_against_reference(inputs, backend, **options(37, 8, activation))


GPU_SHAPES = [
    dict(lead=(65536,), d=2, rank=256, dbar=8, activation="spder"),  # the implicit-representation benchmark
    dict(lead=(65536,), d=2, rank=256, dbar=8, activation="sin"),
    dict(lead=(4096,), d=512, rank=512, dbar=16, activation="spder"),  # a deep LRNN's hidden layer
    dict(lead=(1000,), d=1, rank=4096, dbar=1, activation="tanh"),
    dict(lead=(300,), d=4096, rank=3, dbar=64, activation="mlp"),
    dict(lead=(777,), d=33, rank=100, dbar=33, activation="arctan"),
]


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"M{s['lead'][0]}-d{s['d']}-r{s['rank']}-dbar{s['dbar']}")
def test_gpu_shapes(backend, dtype, shape):
    shape = dict(shape)
    check_against_reference(make_inputs(**shape, dtype=dtype, device="cuda"), backend,
                            **options(shape["rank"], shape["dbar"], shape["activation"]))


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_dbar_does_not_overflow(dtype):
    x = torch.randn(4096, 2, dtype=dtype, device="cuda")
    weight = torch.zeros(2 * 64, 2, dtype=dtype, device="cuda")
    bias = torch.tensor(([math.pi / 2] * 32 + [-math.pi / 6] * 32) * 2, dtype=dtype, device="cuda")
    for backend in gpu_backends():
        check_against_reference([x, weight, bias, None], backend, rank=2, dbar=64, activation="sin", gamma=1.0)


@cuda
@requires_cuda
def test_gpu_triton_every_config():
    """Tests run with one config; the benchmarks autotune over all of them, so each must be right."""
    args_cpu = make_inputs(lead=(1000,), d=40, rank=50, dbar=8, h=3, activation="mlp", dtype=torch.bfloat16)
    x, weight, bias, gp = (t.cuda() for t in args_cpu)
    args = (x, weight, bias, gp, 50, 8, "mlp", 1.0, 8 ** -0.5)
    ref = lrnn_reference
    args64 = (x.double(), weight.double(), bias.double(), gp.double(), *args[4:])
    grad_phi = torch.randn(1000, 50, device="cuda", dtype=torch.bfloat16)
    expected_phi = ref.forward(*args64)
    expected = ref.backward(grad_phi.double(), *args64, [True] * 4)
    for config in lrnn_triton._FWD_CONFIGS:
        launch = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        assert_close(f"phi {config}", lrnn_triton.forward(*args, kernel=lrnn_triton._lrnn_fwd_kernel, **launch),
                     expected_phi)
    for config in lrnn_triton._BWD_CONFIGS:
        launch = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        grads = lrnn_triton.backward(grad_phi, *args, [True] * 4, kernel=lrnn_triton._lrnn_grad_z_kernel, **launch)
        for name, g, e in zip(("dx", "dweight", "dbias", "dg_params"), grads, expected):
            assert_close(f"{name} {config}", g, e)


@cuda
@requires_cuda
def test_gpu_triton_backward_memory_is_bounded():
    """The backward's transient memory is one grad_z chunk (CHUNK_BYTES) beyond the gradients it returns, not the
    (M, rank * dbar) grad_z: at M 65536, r 256, dbar 8 in bf16 that is 32 MiB against 256 MiB."""
    x, weight, bias, _ = make_inputs(lead=(65536,), d=2, rank=256, dbar=8, dtype=torch.bfloat16, device="cuda")
    grad_phi = torch.randn(65536, 256, device="cuda", dtype=torch.bfloat16)
    args = (grad_phi, x, weight, bias, None, 256, 8, "spder", 1.0, 8 ** -0.5, [True, True, True, False])
    lrnn_triton.backward(*args)  # warm-up: compiles, and cuBLAS takes its workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = lrnn_triton.backward(*args)
    torch.cuda.synchronize()
    returned = sum(g.numel() * g.element_size() for g in grads if g is not None)
    transient = torch.cuda.max_memory_allocated() - before - returned
    full_grad_z = 65536 * 256 * 8 * 2
    assert transient <= lrnn_common.CHUNK_BYTES + 2**20, f"{transient} bytes (full grad_z: {full_grad_z})"


@pytest.mark.parametrize("rank, dbar, element_size", [(256, 8, 2), (7, 3, 4), (4096, 64, 2), (4096, 64, 4),
                                                      (1, 1, 8)])
def test_backward_chunks_stay_within_the_budget(rank, dbar, element_size):
    rows = lrnn_common.chunk_rows(rank, dbar, element_size, lrnn_common.CHUNK_BYTES)
    assert rows % 16 == 0 and rows * rank * dbar * element_size <= lrnn_common.CHUNK_BYTES
    assert (rows + 16) * rank * dbar * element_size > lrnn_common.CHUNK_BYTES or rows % lrnn_common.ROW_ALIGN == 0


@cuda
@requires_cuda
def test_gpu_mlp_gradients_deterministic():
    inputs = make_inputs(lead=(20000,), d=2, rank=64, dbar=8, h=4, activation="mlp", dtype=torch.bfloat16,
                         device="cuda")
    _, first, grad_phi = run(inputs, backend="triton", **options(64, 8, "mlp"))
    _, second, _ = run(inputs, grad_phi, backend="triton", **options(64, 8, "mlp"))
    assert all(torch.equal(a, b) for a, b in zip(first, second) if a is not None)


@cuda
@requires_cuda
def test_gpu_auto_backend_and_compile():
    x, weight, bias, _ = make_inputs(lead=(64,), d=2, rank=16, dbar=8, dtype=torch.bfloat16, device="cuda")
    fn = torch.compile(lambda *t: hk.lrnn_product(*t, rank=16, dbar=8, activation="spder"), fullgraph=True)
    assert_close("phi", fn(x, weight, bias),
                 hk.lrnn_product(x.double(), weight.double(), bias.double(), rank=16, dbar=8, activation="spder"))


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_module_trains(dtype):
    """One step of a deep LRNN in `dtype` on the GPU: finite loss and gradients for every parameter."""
    model = hk.nn.LRNN(2, [64, 64], 1, dbar=8, activation="spder").to(device="cuda", dtype=dtype)
    loss = model(torch.rand(4096, 2, device="cuda", dtype=dtype)).square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
