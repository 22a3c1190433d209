"""poly_sa and poly_sa_pool (Poly-SA) and hk.nn.PolySA: the reference against the survey's formula and a per-row
masked mean, gradcheck of the hand-written backward, every backend available here against the float64 reference
(output and every gradient; masks: none, all true, ragged, all false), N = 1, odd C, determinism, strides, empty
batch, opcheck, torch.compile, bad input, and the module against a transcription of the survey's PolySA.
(The Triton kernels with explicit tiles and token splits are checked, values included, in test_out_of_bounds.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from utils import HAS_CUDA, assert_close, cpu_backends, cuda, forward_backward, gpu_backends, rel_err, requires_cuda

import hadamard_kernels as hk
from hadamard_kernels import _backend
from hadamard_kernels.ops.poly_sa.op import poly_sa_op, poly_sa_pool_op

EXT, EXT_MISSING = _backend.cuda_extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"hadamard_kernels._C not built: {EXT_MISSING}")

GRAD_NAMES = ("dz", "dw1", "dw2", "dw3", "dalpha", "dbeta")
OPS = ("poly_sa", "poly_sa_pool")
MASKS = ("none", "all-true", "ragged", "all-false")


def make_inputs(B=3, N=13, C=23, dtype=torch.float64, device="cpu", seed=0, scalar_shape=(1,)):
    """[z, w1, w2, w3, alpha, beta]: the survey's scales (weights randn / sqrt(C), alpha and beta randn)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    ws = [torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C) for _ in range(3)]
    scalars = [torch.randn(scalar_shape, generator=g, dtype=torch.float64) for _ in range(2)]
    return [t.to(device=device, dtype=dtype) for t in (z, *ws, *scalars)]


def make_mask(kind, B, N, device="cpu", seed=1):
    """None, all True, all False, or ragged: random tokens padded, the first row full and the last one empty."""
    if kind == "none":
        return None
    if kind in ("all-true", "all-false"):
        return torch.full((B, N), kind == "all-true", device=device)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[0] = True
    mask[-1] = False
    return mask.to(device)


def call(op, mask, backend):
    if op == "poly_sa":
        return lambda *t: hk.poly_sa(*t, mask=mask, backend=backend)
    return lambda *t: hk.poly_sa_pool(*t, mask=mask, backend=backend)


def op_inputs(op, inputs):
    return inputs if op == "poly_sa" else inputs[:3]


def run(op, inputs, mask, grad=None, *, backend):
    """Output and the gradients of the op on leaf copies of `inputs`; asserts that the backend's own kernels ran in
    the forward and in the backward."""
    (out,), grads, (grad,) = forward_backward(call(op, mask, backend), op_inputs(op, inputs),
                                              None if grad is None else (grad,), backend=backend,
                                              expect_kernels=inputs[0].numel() > 0)
    return out, grads, grad


def check_against_reference(op, inputs, mask, backend):
    """`backend` on `inputs` against the reference on their float64 copies (given the same rounded output gradient):
    the output and every gradient."""
    dtype = inputs[0].dtype
    out, grads, grad = run(op, inputs, mask, backend=backend)
    ref, ref_grads, _ = run(op, [t.double() for t in inputs], mask, grad=grad.to(dtype).double(),
                            backend="reference")
    assert_close(op, out, ref, dtype)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(f"{op} {name}", g, r, dtype)
    return out, grads


# ---------------------------------------------------------------- the reference is the survey's formula
def survey_formula(z, W1, W2, W3, alpha, beta):
    """The survey's PolySA forward, as written there (z @ W, mean over the token dim)."""
    m = torch.mean(torch.matmul(z, W1) * torch.matmul(z, W2), dim=1)
    return alpha * z + beta * torch.matmul(z * m.unsqueeze(1), W3), m


def masked_by_rows(z, W1, W2, W3, alpha, beta, mask):
    """Row by row: the mean over the real tokens only (zeros for a row with none), then every token's output."""
    ms = []
    for b in range(z.shape[0]):
        real = z[b][mask[b]]
        ms.append(((real @ W1) * (real @ W2)).mean(0) if len(real) else torch.zeros(z.shape[-1], dtype=z.dtype))
    m = torch.stack(ms)
    return alpha * z + beta * ((z * m[:, None, :]) @ W3), m


@pytest.mark.parametrize("mask_kind", MASKS)
def test_reference_matches_survey_formula(mask_kind):
    inputs = make_inputs(B=4, N=9, C=7)
    mask = make_mask(mask_kind, 4, 9)
    y, m = survey_formula(*inputs) if mask is None else masked_by_rows(*inputs, mask)
    assert_close("y", hk.poly_sa(*inputs, mask=mask, backend="reference"), y, tol=1e-12)
    assert_close("m", hk.poly_sa_pool(*inputs[:3], mask=mask, backend="reference"), m, tol=1e-12)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mask_kind", ["none", "ragged"])
def test_reference_backward_gradcheck(op, mask_kind):
    inputs = op_inputs(op, make_inputs(B=3, N=4, C=3))
    mask = make_mask(mask_kind, 3, 4)
    assert torch.autograd.gradcheck(call(op, mask, "reference"), [t.requires_grad_() for t in inputs])


# ---------------------------------------------------------------- every backend on this machine
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_matches_reference_float64(backend, op, mask_kind):
    inputs = make_inputs()
    check_against_reference(op, inputs, make_mask(mask_kind, 3, 13), backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(backend, dtype, op):
    if backend not in cpu_backends(dtype):
        pytest.skip(f"{backend} does not run {dtype} on the CPU")
    check_against_reference(op, make_inputs(dtype=dtype), make_mask("ragged", 3, 13), backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", OPS)
def test_all_true_mask_is_no_mask(backend, op):
    """Bit for bit: a mask with every token real is the same call as no mask, output and gradients."""
    inputs = make_inputs(dtype=torch.float32)
    out, grads, grad = run(op, inputs, None, backend=backend)
    out_masked, grads_masked, _ = run(op, inputs, make_mask("all-true", 3, 13), grad, backend=backend)
    assert torch.equal(out, out_masked)
    for name, g, gm in zip(GRAD_NAMES, grads, grads_masked):
        assert torch.equal(g, gm), name


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("backend", cpu_backends())
def test_no_real_token_gives_zero_pool(backend):
    """A row with no real token: m = 0 exactly (not NaN), so Y = alpha * z, and the pool's weights get no gradient;
    an inf in a padded token is left out of the mean."""
    inputs = make_inputs(B=2, N=6, C=5)
    mask = make_mask("all-false", 2, 6)
    inputs[0][1, 2, 3] = float("inf")
    m = hk.poly_sa_pool(*inputs[:3], mask=mask, backend=backend)
    assert torch.equal(m, torch.zeros_like(m))
    inputs[0][1, 2, 3] = 0.5
    y, grads, _ = run("poly_sa", inputs, mask, backend=backend)
    alpha = inputs[4]
    assert torch.equal(y, (alpha * inputs[0]).to(y.dtype))
    assert grads[1].abs().sum() == 0 and grads[2].abs().sum() == 0, "dw1, dw2 of an empty mean"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", [
    dict(B=1, N=1, C=1),     # smallest
    dict(B=4, N=1, C=20),    # N = 1: m is the token's own product
    dict(B=2, N=40, C=37),   # several token tiles, odd C
    dict(B=2, N=5, C=70),    # C past one column block and one contraction chunk
])
def test_shapes(backend, shape):
    B, N = shape["B"], shape["N"]
    check_against_reference("poly_sa", make_inputs(**shape), make_mask("ragged" if B > 1 else "none", B, N),
                            backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_scalars_of_shape_zero_and_numbers(backend):
    """alpha and beta as 0-d tensors (gradients keep that shape) and as plain numbers (constants)."""
    inputs = make_inputs(B=2, N=5, C=6, scalar_shape=())
    _, grads = check_against_reference("poly_sa", inputs, None, backend)
    assert grads[4].shape == () and grads[5].shape == ()
    z, w1, w2, w3 = inputs[:4]
    y = hk.poly_sa(z, w1, w2, w3, 0.5, -1.25, backend=backend)
    assert_close("y", y, hk.poly_sa(z, w1, w2, w3, torch.tensor(0.5, dtype=z.dtype),
                                    torch.tensor(-1.25, dtype=z.dtype), backend="reference"))


@pytest.mark.parametrize("backend", cpu_backends())
def test_deterministic(backend):
    """Two runs give the same bits, output and every gradient (fixed-order reductions, no atomics)."""
    inputs = make_inputs(B=2, N=40, C=24, dtype=torch.float32)
    mask = make_mask("ragged", 2, 40)
    first = run("poly_sa", inputs, mask, backend=backend)
    second = run("poly_sa", inputs, mask, first[2], backend=backend)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(GRAD_NAMES, first[1], second[1]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", cpu_backends(torch.float16))
def test_float16_long_contraction_accumulates_in_float32(backend):
    """C = 256 in float16 with positive terms (no cancellation): the projections and the token sum in fp32 leave the
    pool off by the rounding of the fp16 output alone; an fp16 accumulator would not (the bound is twice the
    output's own rounding error). C is kept at 256 for the interpreter's speed."""
    g = torch.Generator().manual_seed(4)
    C = 256
    z = torch.rand(1, 4, C, generator=g).half()
    w1, w2 = (torch.rand(C, C, generator=g) / C).half(), (torch.rand(C, C, generator=g) / C).half()
    m = hk.poly_sa_pool(z, w1, w2, backend=backend)
    exact = hk.poly_sa_pool(z.double(), w1.double(), w2.double(), backend="reference")
    assert_close("m", m, exact, tol=2 * rel_err(exact.half(), exact))


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_inputs(backend):
    """z sliced from a wider tensor, transposed weight views and a strided mask give the contiguous result."""
    inputs = make_inputs(B=2, N=7, C=9)
    z = inputs[0]
    wide = torch.zeros(2, 7, 20, dtype=z.dtype)
    wide[..., 4:13] = z
    ws = [w.T.contiguous().T for w in inputs[1:4]]
    mask_wide = make_mask("ragged", 2, 14)
    assert not wide[..., 4:13].is_contiguous() and not ws[0].is_contiguous()
    assert not mask_wide[:, ::2].is_contiguous()
    y = hk.poly_sa(wide[..., 4:13], *ws, *inputs[4:], mask=mask_wide[:, ::2], backend=backend)
    assert_close("y", y, hk.poly_sa(*inputs, mask=mask_wide[:, ::2].contiguous(), backend="reference"))
    one = torch.randn(1, 1, 18, dtype=z.dtype)[..., ::2]  # a single token, channel stride 2
    assert_close("y of one strided token", hk.poly_sa(one, *ws, *inputs[4:], backend=backend),
                 hk.poly_sa(one.contiguous(), *inputs[1:], backend="reference"))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B, N", [(0, 5), (3, 0)])
def test_empty(backend, op, B, N):
    """No batch rows, or no tokens: empty outputs (m = 0 for rows with no token) and zero weight gradients."""
    inputs = make_inputs(B=B, N=N, C=4)
    out, grads, _ = run(op, inputs, None, backend=backend)
    assert out.shape == ((B, N, 4) if op == "poly_sa" else (B, 4)) and not out.abs().sum()
    assert grads[0].shape == (B, N, 4)
    assert all(g.abs().sum() == 0 for g in grads[1:])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(backend, op):
    """Finite differences of the backend's own forward (fast mode: random projections, a few calls each)."""
    inputs = op_inputs(op, make_inputs(B=2, N=3, C=4))
    mask = make_mask("ragged", 2, 3)
    assert torch.autograd.gradcheck(call(op, mask, backend), [t.requires_grad_() for t in inputs], fast_mode=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mask_kind", ["none", "ragged"])
def test_opcheck(backend, mask_kind):
    inputs = [t.requires_grad_() for t in make_inputs(B=2, N=3, C=4)]
    mask = make_mask(mask_kind, 2, 3)
    torch.library.opcheck(poly_sa_pool_op, (*inputs[:3], mask, backend))
    torch.library.opcheck(poly_sa_op, (*inputs, mask, backend))


def test_torch_compile_fullgraph():
    inputs = make_inputs(B=2, N=5, C=6, dtype=torch.float32)
    mask = make_mask("ragged", 2, 5)

    def fn(*t):
        return (hk.poly_sa(*t, mask=mask) + hk.poly_sa_pool(*t[:3], mask=mask)[:, None, :]).square().sum()

    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves).backward()
    expected = [t.clone().requires_grad_() for t in inputs]
    fn(*expected).backward()
    for name, a, b in zip(GRAD_NAMES, leaves, expected):
        assert_close(name, a.grad, b.grad.double())


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(z=a["z"][0]), "z"),
    (lambda a: a.update(z=a["z"].to(torch.int32)), "z"),
    (lambda a: a.update(z=a["z"][..., :0]), r"z.shape\[-1\]"),
    (lambda a: a.update(w1=a["w1"][:, :-1]), "w1"),
    (lambda a: a.update(w2=a["w2"][None]), "w2"),
    (lambda a: a.update(w3=a["w3"][:-1]), "w3"),
    (lambda a: a.update(w1=a["w1"].float()), "w1"),
    (lambda a: a.update(w3=a["w3"].float()), "w3"),
    (lambda a: a.update(alpha=torch.ones(2, dtype=torch.float64)), "alpha"),
    (lambda a: a.update(alpha=torch.ones(1, 1, dtype=torch.float64)), "alpha"),
    (lambda a: a.update(beta=torch.ones(4, dtype=torch.float64)), "beta"),
    (lambda a: a.update(beta=a["beta"].float()), "beta"),
    (lambda a: a.update(alpha=float("nan")), "alpha"),
    (lambda a: a.update(beta="1"), "beta"),
    (lambda a: a.update(mask=torch.ones(3, 5, dtype=torch.bool)), "mask"),
    (lambda a: a.update(mask=torch.ones(3, dtype=torch.bool)), "mask"),
    (lambda a: a.update(mask=torch.ones(3, 4)), "mask"),
    (lambda a: a.update(mask=torch.ones(3, 4, dtype=torch.int64)), "mask"),
    (lambda a: a.update(mask=[[True] * 4] * 3), "mask"),
    (lambda a: a.update(backend="gpu"), "backend"),
])
def test_bad_input_raises_value_error(change, argument):
    z, w1, w2, w3, alpha, beta = make_inputs(B=3, N=4, C=5)
    args = dict(z=z, w1=w1, w2=w2, w3=w3, alpha=alpha, beta=beta, mask=None, backend="reference")
    change(args)
    with pytest.raises(ValueError, match=argument):
        hk.poly_sa(**args)
    if argument not in ("w3", "alpha", "beta"):  # poly_sa_pool takes z, w1, w2 and the mask
        del args["w3"], args["alpha"], args["beta"]
        with pytest.raises(ValueError, match=argument):
            hk.poly_sa_pool(**args)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("op", OPS)
def test_unavailable_backend_raises_runtime_error(op):
    with pytest.raises(RuntimeError, match="backend 'cuda'.*not available"):
        call(op, None, "cuda")(*op_inputs(op, make_inputs(B=1, N=2, C=3)))


# ---------------------------------------------------------------- the CUDA kernels' host-side parts
@needs_ext
@pytest.mark.parametrize("real", [True, False])
def test_cuda_epilogue_math_host(real):
    """The kernels' element math (host build): a padded token's product and pool gradients are exactly 0 even when
    its projections are inf or s is NaN; the output and the direct gradient in float32."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    for p1, p2, s in [(1.5, -2.0, 0.25), (float("inf"), 3.0, float("nan")), (0.0, float("inf"), 2.0)]:
        term, dp1, dp2, _, _ = EXT.poly_sa_epilogue_host(real, p1, p2, s, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        if real:
            for got, want in ((term, f32(p1) * f32(p2)), (dp1, f32(s) * f32(p2)), (dp2, f32(s) * f32(p1))):
                assert torch.equal(f32(got).isnan(), want.isnan()) and (want.isnan() or f32(got) == want)
        else:
            assert (term, dp1, dp2) == (0.0, 0.0, 0.0)
    alpha, beta, z, g, gp, m, acc = 0.75, -1.5, 2.0, 0.5, 3.0, -0.25, 4.0
    *_, y, dz = EXT.poly_sa_epilogue_host(real, 0.0, 0.0, 0.0, alpha, beta, z, g, gp, m, acc)
    assert y == alpha * z + beta * acc and dz == alpha * g + beta * gp * m  # exact in float32 for these values


@needs_ext
def test_cuda_launchers_refuse_bad_params():
    """Invalid sizes, strides or missing pointers are refused before any launch (safe on a GPU too) and surface as
    RuntimeError naming the launcher."""
    good = dict(z=256, w1=256, w2=256, w3=256, alpha=256, beta=256, m=256, s=256, grad_y=256, part=256, y=256,
                dz=256, u=256, grad_p=256, B=2, N=3, C=4, tokens_per_split=128, z_row_stride=4, g_row_stride=4,
                out_row_stride=4, dtype=0)
    for launcher, change in [("poly_sa_pool_fwd", dict(B=0)), ("poly_sa_pool_fwd", dict(tokens_per_split=0)),
                             ("poly_sa_pool_fwd", dict(part=0)), ("poly_sa_out_fwd", dict(out_row_stride=3)),
                             ("poly_sa_out_fwd", dict(m=0)), ("poly_sa_out_bwd", dict(grad_y=0)),
                             ("poly_sa_out_bwd", dict(z_row_stride=2)), ("poly_sa_pool_bwd", dict(s=0)),
                             ("poly_sa_pool_bwd", dict(C=0)), ("poly_sa_pool_bwd", dict(dtype=7))]:
        with pytest.raises(RuntimeError, match=f"{launcher} failed"):
            getattr(EXT, launcher)(EXT.PolySaParams(**{**good, **change}), 0)


@needs_ext
@pytest.mark.skipif(HAS_CUDA, reason="checks the error path of a machine without a GPU")
def test_cuda_launch_without_gpu_raises():
    params = EXT.PolySaParams(z=256, w1=256, w2=256, part=256, B=1, N=1, C=1, tokens_per_split=128, z_row_stride=1,
                              dtype=0)
    with pytest.raises(RuntimeError, match="poly_sa_pool_fwd failed"):
        EXT.poly_sa_pool_fwd(params, 0)


# ---------------------------------------------------------------- hk.nn.PolySA against the survey's module
class SurveyPolySA(nn.Module):
    """Transcription of the survey's PolySA (arXiv 2504.13112, §S.2): z @ W (not W.T), alpha and beta of shape
    (1,), weights randn / sqrt(C) drawn in the order W1, W2, W3, alpha, beta."""

    def __init__(self, channels):
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(channels, channels) / math.sqrt(channels))
        self.W2 = nn.Parameter(torch.randn(channels, channels) / math.sqrt(channels))
        self.W3 = nn.Parameter(torch.randn(channels, channels) / math.sqrt(channels))
        self.alpha = nn.Parameter(torch.randn(1))
        self.beta = nn.Parameter(torch.randn(1))

    def forward(self, z):
        m = torch.mean(torch.matmul(z, self.W1) * torch.matmul(z, self.W2), dim=1)
        return self.alpha * z + self.beta * torch.matmul(z * m.unsqueeze(1), self.W3)


def module_pair(channels, backend, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    theirs = SurveyPolySA(channels).to(device=device, dtype=dtype)
    ours = hk.nn.PolySA(channels, backend=backend).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def module_forward_backward(model, z, mask=None, grad_seed=2):
    """Output, input gradient and {name: gradient} for a fixed random output gradient."""
    model.zero_grad(set_to_none=True)
    z = z.detach().clone().requires_grad_()
    out = model(z) if mask is None else model(z, mask)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out))
    return out.detach(), z.grad, {name: p.grad for name, p in model.named_parameters()}


def assert_modules_match(ours, theirs, z, mask=None, tol=1e-5):
    out, dz, grads = module_forward_backward(ours, z, mask)
    ref_out, ref_dz, ref_grads = module_forward_backward(theirs, z)
    assert grads.keys() == ref_grads.keys()
    assert_close("Y", out, ref_out, tol=tol)
    assert_close("dz", dz, ref_dz, tol=tol)
    for name, g in grads.items():
        assert_close(f"d{name}", g, ref_grads[name], tol=tol)


def test_module_state_dict_and_initialisation():
    torch.manual_seed(3)
    theirs = SurveyPolySA(12)
    torch.manual_seed(3)
    ours = hk.nn.PolySA(12)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["W1", "W2", "W3", "alpha", "beta"]
    for name, t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), f"{name}: one seed must give the survey's values"
    back = SurveyPolySA(12)
    back.load_state_dict(ours.state_dict())
    assert ours.alpha.shape == (1,) and ours.W1.shape == (12, 12) and "channels=12" in repr(ours)
    torch.manual_seed(0)
    wide = hk.nn.PolySA(400)
    for name in ("W1", "W2", "W3"):
        assert abs(getattr(wide, name).std().item() - 1 / 20) < 5e-3, f"{name}: randn / sqrt(C)"


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_module_outputs_and_grads_match_survey(backend):
    theirs, ours = module_pair(19, backend)
    z = torch.randn(3, 11, 19, generator=torch.Generator().manual_seed(1))
    assert_modules_match(ours, theirs, z)
    assert_modules_match(ours, theirs, z, mask=torch.ones(3, 11, dtype=torch.bool))


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_module_mask_drops_padding(backend):
    """Ragged sequences padded into one batch: each row's output equals the survey module on that row's real tokens
    alone (with padding tokens' outputs computed from the same mean)."""
    theirs, ours = module_pair(10, backend, dtype=torch.float64)
    lengths = [7, 3]
    z = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    y = ours(z, mask)
    for b, n in enumerate(lengths):
        assert_close(f"row {b}", y[b, :n], theirs(z[b:b + 1, :n])[0])


@pytest.mark.parametrize("make, error, match", [
    (lambda: hk.nn.PolySA(0), ValueError, "channels"),
    (lambda: hk.nn.PolySA(2.5), ValueError, "channels"),
])
def test_module_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_module_float64_and_meta():
    theirs, ours = module_pair(6, "reference", dtype=torch.float64)
    assert_modules_match(ours, theirs, torch.randn(2, 4, 6, dtype=torch.float64), tol=1e-12)
    meta = hk.nn.PolySA(6, device="meta")
    assert meta(torch.empty(2, 4, 6, device="meta")).shape == (2, 4, 6)


# ---------------------------------------------------------------- GPU
GPU_SHAPES = [dict(B=3, N=37, C=45), dict(B=2, N=197, C=96), dict(B=1, N=1, C=17), dict(B=2, N=600, C=130)]


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mask_kind", ["none", "ragged"])
def test_gpu_matches_reference(backend, dtype, op, mask_kind):
    check_against_reference(op, make_inputs(dtype=dtype, device="cuda"),
                            make_mask(mask_kind, 3, 13, device="cuda"), backend)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_shapes(backend, dtype, shape):
    check_against_reference("poly_sa", make_inputs(**shape, dtype=dtype, device="cuda"),
                            make_mask("ragged" if shape["B"] > 1 else "none", shape["B"], shape["N"], "cuda"),
                            backend)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_long_sequence_deterministic(backend):
    """N = 20000 tokens split over many programs: the reference's answer, and the same bits on a second run."""
    inputs = make_inputs(B=2, N=20000, C=64, dtype=torch.bfloat16, device="cuda")
    mask = make_mask("ragged", 2, 20000, device="cuda")
    check_against_reference("poly_sa", inputs, mask, backend)
    out_first, grads_first, grad = run("poly_sa", inputs, mask, backend=backend)
    again, grads_again, _ = run("poly_sa", inputs, mask, grad, backend=backend)
    assert torch.equal(out_first, again)
    for name, a, b in zip(GRAD_NAMES, grads_first, grads_again):
        assert torch.equal(a, b), name


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_module_matches_survey(backend, dtype):
    """hk.nn.PolySA in `dtype` against the float64 survey module; in bf16 the error may also reach twice that of the
    survey module run in bf16."""
    theirs, ours = module_pair(96, backend, dtype=dtype, device="cuda")
    exact = SurveyPolySA(96).to(device="cuda", dtype=torch.float64)
    exact.load_state_dict(theirs.state_dict())
    z = torch.randn(4, 197, 96, device="cuda").to(dtype)
    out, dz, grads = module_forward_backward(ours, z)
    same_out, same_dz, same_grads = module_forward_backward(theirs, z)
    ref_out, ref_dz, ref_grads = module_forward_backward(exact, z.double())
    for name, got, same, ref in [("Y", out, same_out, ref_out), ("dz", dz, same_dz, ref_dz),
                                 *[(f"d{k}", grads[k], same_grads[k], ref_grads[k]) for k in grads]]:
        allowed = 1e-5 if dtype == torch.float32 else max(1e-2, 2 * rel_err(same, ref))
        assert not torch.isnan(got).any() and rel_err(got, ref) < allowed, f"{name}: {rel_err(got, ref):.2e}"


@cuda
@requires_cuda
def test_gpu_auto_backend_and_compile():
    inputs = make_inputs(B=2, N=50, C=32, dtype=torch.bfloat16, device="cuda")
    fn = torch.compile(lambda *t: hk.poly_sa(*t), fullgraph=True)
    assert_close("y", fn(*inputs), hk.poly_sa(*[t.double() for t in inputs]))
