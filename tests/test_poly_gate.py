"""poly_gate (MONet's PolyMlp gate), spatial_shift and the PolyMlp / PolyBlock drop-ins: the reference against a
naive autograd form and the explicit shift formula, every backend available here against the float64 reference
(forward and all seven gradients), gradcheck, opcheck, torch.compile, bad input, and the modules against a
plain-PyTorch transcription of the survey's code."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn
from utils import (
    HAS_CUDA,
    assert_close,
    cpu_backends,
    cuda,
    forward_backward,
    gpu_backends,
    recorded_launches,
    rel_err,
    requires_cuda,
)

import hadamard_kernels as hk
from hadamard_kernels import _backend
from hadamard_kernels.ops.poly_gate import common
from hadamard_kernels.ops.poly_gate.op import poly_gate_op

GRAD_NAMES = ("da", "db", "dln1_weight", "dln1_bias", "dln2_weight", "dln2_bias", "dalpha")
ALPHAS = {"none": None, "scalar": (1,), "0d": (), "channel": "C"}
# Odd sizes: 2 x 5 x 6 pixels, C = 37 (shift groups 9, 9, 9, 10 wide; 37 is not a power of two).
SPATIAL_SHAPE = (2, 5, 6, 37)
FLAT_SHAPE = (3, 13, 45)


def make_inputs(shape=FLAT_SHAPE, alpha="scalar", dtype=torch.float64, device="cpu", seed=0):
    """[a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha]: rows with a mean away from 0 and O(1) spread."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    randn = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    a = 0.5 + 1.5 * randn(*shape)
    b = randn(*shape)
    params = [1 + 0.3 * randn(C), 0.2 * randn(C), 1 + 0.3 * randn(C), 0.2 * randn(C)]
    alpha_shape = ALPHAS[alpha]
    al = None if alpha_shape is None else 0.8 + 0.3 * randn(*((C,) if alpha_shape == "C" else alpha_shape))
    return [None if t is None else t.to(device=device, dtype=dtype) for t in (a, b, *params, al)]


def run(inputs, grad_y=None, *, backend, **options):
    """Output and the seven gradients of poly_gate on leaf copies of `inputs`; asserts that the backend's own
    kernels ran in the forward and in the backward."""
    (y,), grads, (grad_y,) = forward_backward(lambda *t: hk.poly_gate(*t, **options, backend=backend), inputs,
                                              None if grad_y is None else (grad_y,), backend=backend,
                                              expect_kernels=inputs[0].numel() > 0)
    return y, grads, grad_y


def check_against_reference(inputs, backend, **options):
    """`backend` on `inputs` against the reference on their float64 copies (given the same rounded output
    gradient): the output and every gradient."""
    dtype = inputs[0].dtype
    y, grads, grad_y = run(inputs, backend=backend, **options)
    ref_y, ref_grads, _ = run([None if t is None else t.double() for t in inputs],
                              grad_y=grad_y.to(dtype).double(), backend="reference", **options)
    assert_close("y", y, ref_y, dtype)
    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads):
        if ref is not None:
            assert_close(name, g, ref, dtype)
    return y, grads


# ---------------------------------------------------------------- the shift is the intended one
def shift_by_formula(x):
    """DESIGN.md §5 pixel by pixel: each channel group reads the neighbouring pixel, the border pixel itself."""
    B, W, H, C = x.shape
    g1, g2, g3 = C // 4, C // 2, 3 * C // 4
    y = torch.empty_like(x)
    for w in range(W):
        for h in range(H):
            y[:, w, h, :g1] = x[:, max(w - 1, 0), h, :g1]
            y[:, w, h, g1:g2] = x[:, min(w + 1, W - 1), h, g1:g2]
            y[:, w, h, g2:g3] = x[:, w, max(h - 1, 0), g2:g3]
            y[:, w, h, g3:] = x[:, w, min(h + 1, H - 1), g3:]
    return y


class SurveySpatialShift(nn.Module):
    """Transcription of the survey's Spatial_Shift: overlapping slices assigned in place."""

    def forward(self, x):
        b, w, h, c = x.size()
        x[:, 1:, :, :c // 4] = x[:, :w - 1, :, :c // 4]
        x[:, :w - 1, :, c // 4:c // 2] = x[:, 1:, :, c // 4:c // 2]
        x[:, :, 1:, c // 2:c * 3 // 4] = x[:, :, :h - 1, c // 2:c * 3 // 4]
        x[:, :, :h - 1, 3 * c // 4:] = x[:, :, 1:, 3 * c // 4:]
        return x


SHIFT_SHAPES = [(2, 5, 7, 13), (1, 1, 4, 6), (1, 3, 1, 3), (2, 2, 2, 1), (1, 4, 3, 8), (1, 6, 5, 25)]


@pytest.mark.parametrize("shape", SHIFT_SHAPES)
def test_spatial_shift_is_the_formula(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = hk.spatial_shift(x)
    assert torch.equal(y, shift_by_formula(x))
    assert torch.equal(hk.nn.SpatialShift()(x), y)
    assert torch.equal(x, torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)), \
        "out of place: the input is left as it was"


@pytest.mark.parametrize("shape", SHIFT_SHAPES)
def test_spatial_shift_transpose(shape):
    """The hand-written transpose (the reference backward of the fused shift) is autograd's gradient of the formula:
    a border pixel read twice gets both terms, the far border pixel none."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad(shift_by_formula(x), x, dy)
    assert torch.equal(common.spatial_shift_adjoint(dy), expected)
    (through_op,) = torch.autograd.grad(hk.spatial_shift(x), x, dy)
    assert torch.equal(through_op, expected)


def test_survey_in_place_shift_is_not_a_shift():
    """README "Modules": the survey's in-place slice copies do not give the one-pixel shift (on CPU they smear the
    first row along the axis), so the drop-ins implement the formula instead."""
    x = torch.arange(1 * 6 * 5 * 8, dtype=torch.float64).reshape(1, 6, 5, 8)
    survey = SurveySpatialShift()(x.clone())
    assert not torch.equal(survey, shift_by_formula(x))
    assert torch.equal(hk.spatial_shift(x), shift_by_formula(x))


# ---------------------------------------------------------------- the reference is the formula
def naive_gate(a, b, w1, b1, w2, b2, alpha, eps, spatial):
    """The issue's formula with autograd: LayerNorm written out (biased variance), the shift pixel by pixel."""
    if spatial:
        a = shift_by_formula(a)

    def layer_norm(x, w, bias):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * w + bias

    n1, n2 = layer_norm(a, w1, b1), layer_norm(b, w2, b2)
    return n1 + (1 if alpha is None else alpha) * n1 * n2


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("alpha", list(ALPHAS))
def test_reference_matches_naive_formula(spatial, alpha):
    inputs = make_inputs(SPATIAL_SHAPE if spatial else FLAT_SHAPE, alpha)
    y, grads, grad_y = run(inputs, backend="reference", eps=1e-5, spatial_shift=spatial)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    expected = naive_gate(*leaves, 1e-5, spatial)
    expected.backward(grad_y)
    assert_close("y", y, expected.detach(), tol=1e-12)
    for name, g, leaf in zip(GRAD_NAMES, grads, leaves):
        if leaf is not None:
            assert_close(name, g, leaf.grad, tol=1e-12)


# ---------------------------------------------------------------- every backend on this machine
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("spatial", [False, True])
def test_matches_reference(backend, dtype, spatial):
    if backend not in cpu_backends(dtype):
        pytest.skip(f"{backend} does not run {dtype} on the CPU")
    inputs = make_inputs(SPATIAL_SHAPE if spatial else FLAT_SHAPE, "scalar", dtype)
    check_against_reference(inputs, backend, spatial_shift=spatial)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("alpha", ["none", "0d", "channel"])
def test_alpha_forms(backend, spatial, alpha):
    """alpha None (= 1), a 0-d tensor, per channel (the module's (1,) form is in test_matches_reference)."""
    inputs = make_inputs(SPATIAL_SHAPE if spatial else FLAT_SHAPE, alpha)
    check_against_reference(inputs, backend, spatial_shift=spatial, eps=1e-5)


def test_alpha_number_is_a_constant():
    inputs = make_inputs(FLAT_SHAPE, "none")
    y = hk.poly_gate(*inputs[:6], 0.4, backend="reference")
    assert_close("y", y, hk.poly_gate(*inputs[:6], torch.tensor(0.4, dtype=torch.float64), backend="reference"),
                 tol=1e-15)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape, spatial", [
    ((1, 1), False),            # one row of one channel: LN1(a) = ln1_bias
    ((70, 3), False),           # fewer channels than shift groups
    ((5, 130), False),          # C past 128 (a 256-wide block)
    ((2, 3, 4, 45), False),     # several leading dims
    ((1, 1, 1, 8), True),       # a single pixel: the shift is the identity
    ((2, 1, 6, 10), True),      # W = 1: the W groups stay in place
    ((1, 3, 2, 9), True),       # W = 3 (4-pixel tiles along W in the backward)
    ((1, 4, 3, 7), True),       # H = 3
    ((1, 2, 9, 5), True),       # W = 2, odd H: the last backward tile along H half empty
    ((1, 7, 5, 3), True),       # C = 3: the first channel group is empty
])
def test_shapes(backend, shape, spatial):
    check_against_reference(make_inputs(shape, "scalar"), backend, spatial_shift=spatial)


@pytest.mark.parametrize("backend", cpu_backends(torch.float16))
def test_float16_long_rows_use_float32_statistics(backend):
    """C = 1024 in float16 with rows offset from 0: statistics accumulated in float32 are off by the rounding of the
    float16 output alone; a float16 accumulator is not. The bound is twice the output's own rounding error."""
    inputs = make_inputs((24, 1024), "scalar", torch.float16)
    inputs[0] = (inputs[0] + 6).half()
    y = hk.poly_gate(*inputs, backend=backend)
    exact = hk.poly_gate(*[t.double() for t in inputs], backend="reference")
    assert_close("y", y, exact, tol=2 * rel_err(exact.half(), exact))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("spatial", [False, True])
def test_strided_inputs(backend, spatial):
    """a and b sliced from wider tensors (row stride > C) give the contiguous result."""
    inputs = make_inputs(SPATIAL_SHAPE if spatial else FLAT_SHAPE, "scalar")
    wide = [torch.zeros(*t.shape[:-1], t.shape[-1] + 11, dtype=t.dtype) for t in inputs[:2]]
    views = []
    for w, t in zip(wide, inputs[:2]):
        w[..., 4:4 + t.shape[-1]] = t
        views.append(w[..., 4:4 + t.shape[-1]])
    assert not views[0].is_contiguous()
    y = hk.poly_gate(*views, *inputs[2:], spatial_shift=spatial, backend=backend)
    assert_close("y", y, hk.poly_gate(*inputs, spatial_shift=spatial, backend="reference"))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape, spatial", [((0, 4, 5, 8), True), ((0, 7), False), ((3, 0, 6), False)])
def test_empty_batch(backend, shape, spatial):
    inputs = make_inputs(shape, "scalar")
    y, grads, _ = run(inputs, backend=backend, spatial_shift=spatial)
    assert y.shape == shape
    assert grads[0].shape == shape and grads[1].shape == shape
    assert all(g.abs().sum() == 0 for g in grads[2:])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("spatial", [False, True])
def test_gradcheck(backend, spatial):
    """Full gradcheck of the reference's hand-written backward; fast mode (random projections) for fused ones."""
    inputs = make_inputs((1, 2, 3, 4) if spatial else (2, 5), "channel")
    fn = lambda *t: hk.poly_gate(*t, spatial_shift=spatial, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in inputs], fast_mode=backend != "reference")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("spatial, alpha", [(True, "scalar"), (False, "none")])
def test_opcheck(backend, spatial, alpha):
    inputs = make_inputs((1, 2, 3, 6) if spatial else (3, 5), alpha)
    args = (*[None if t is None else t.requires_grad_() for t in inputs], 1e-6, spatial, backend)
    torch.library.opcheck(poly_gate_op, args)


def test_torch_compile_fullgraph():
    inputs = make_inputs(SPATIAL_SHAPE, "scalar", torch.float32)
    fn = lambda *t: hk.poly_gate(*t, spatial_shift=True).square().sum()  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves).backward()
    expected = [t.clone().requires_grad_() for t in inputs]
    fn(*expected).backward()
    for name, a, b in zip(GRAD_NAMES, leaves, expected):
        assert_close(name, a.grad, b.grad.double())


def test_spatial_shift_compiles_fullgraph():
    x = torch.randn(2, 4, 5, 9)
    compiled = torch.compile(hk.spatial_shift, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), shift_by_formula(x))


# ---------------------------------------------------------------- Triton tilings
@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
@pytest.mark.parametrize("spatial, shape, fwd, bwd, programs", [
    (False, (35, 45), dict(BM=4, BC=64, num_warps=4), dict(TW=1, TH=4, BC=64, num_warps=4), 3),
    (True, (1, 5, 6, 37), dict(BM=8, BC=64, num_warps=4), dict(TW=2, TH=2, BC=64, num_warps=4), 4),
    (True, (1, 7, 3, 21), dict(BM=2, BC=32, num_warps=4), dict(TW=4, TH=4, BC=32, num_warps=4), 1),
    (True, (2, 9, 4, 10), dict(BM=16, BC=16, num_warps=4), dict(TW=8, TH=2, BC=16, num_warps=4), 2),
])
def test_triton_tilings(spatial, shape, fwd, bwd, programs):
    """Explicit tilings (the launchers pick one per C): ragged row tiles, pixel tiles of every size, the
    persistent backward with several tiles per program."""
    from hadamard_kernels.ops.poly_gate import reference
    from hadamard_kernels.ops.poly_gate import triton as triton_backend

    inputs = make_inputs(shape, "channel")
    options = (1e-6, spatial)
    y = triton_backend.forward(*inputs, *options, **fwd)
    assert_close("y", y, reference.forward(*inputs, *options))
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = triton_backend.backward(grad_y, *inputs, *options, [True] * 7, programs=programs, **bwd)
    ref = reference.backward(grad_y, *inputs, *options, [True] * 7)
    for name, g, r in zip(GRAD_NAMES, grads, ref):
        assert_close(name, g, r)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(b=a["b"][..., :-1]), "b must have a's shape"),
    (lambda a: a.update(b=a["b"][None]), "b must have a's shape"),
    (lambda a: a.update(a=a["a"].to(torch.int32), b=a["b"].to(torch.int32)), "a must have dtype"),
    (lambda a: a.update(a=[1.0]), "a must be a torch.Tensor"),
    (lambda a: a.update(ln1_weight=a["ln1_weight"][:-1]), "ln1_weight"),
    (lambda a: a.update(ln1_bias=a["ln1_bias"][None]), "ln1_bias"),
    (lambda a: a.update(ln2_weight=a["ln2_weight"].float()), "ln2_weight"),
    (lambda a: a.update(ln2_bias=None), "ln2_bias"),
    (lambda a: a.update(alpha=a["alpha"].expand(2).clone()), "alpha"),
    (lambda a: a.update(alpha="1"), "alpha"),
    (lambda a: a.update(alpha=float("nan")), "alpha"),
    (lambda a: a.update(alpha=a["alpha"].float()), "alpha"),
    (lambda a: a.update(eps=0.0), "eps"),
    (lambda a: a.update(eps="1e-6"), "eps"),
    (lambda a: a.update(spatial_shift=1), "spatial_shift"),
    (lambda a: a.update(spatial_shift=True, a=a["a"][0], b=a["b"][0]), "a must have 4 dims"),
    (lambda a: a.update(backend="gpu"), "backend"),
])
def test_bad_input_raises_value_error(change, argument):
    a, b, w1, b1, w2, b2, alpha = make_inputs((2, 3, 4, 5), "scalar")
    args = dict(a=a, b=b, ln1_weight=w1, ln1_bias=b1, ln2_weight=w2, ln2_bias=b2, alpha=alpha, eps=1e-6,
                spatial_shift=False, backend="reference")
    change(args)
    with pytest.raises(ValueError, match=argument):
        hk.poly_gate(**args)


def test_zero_channels_raise_value_error():
    inputs = make_inputs((3, 0), "none")
    with pytest.raises(ValueError, match=r"a.shape\[-1\]"):
        hk.poly_gate(*inputs, backend="reference")


@pytest.mark.parametrize("x", [torch.zeros(2, 3, 4), torch.zeros(1, 2, 3, 4, 5), [[1.0]]])
def test_spatial_shift_bad_input(x):
    with pytest.raises(ValueError, match="x must"):
        hk.spatial_shift(x)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
def test_triton_rows_past_max_c():
    """Rows wider than MAX_C take the chunked (wide) kernels: the output and every gradient, with the shift."""
    from hadamard_kernels.ops.poly_gate import triton as triton_backend

    with recorded_launches() as log:
        check_against_reference(make_inputs((1, 2, 2, triton_backend.MAX_C + 1), "channel"), "triton",
                                spatial_shift=True)
    assert set(log.triton) == {"_poly_gate_wide_fwd_kernel", "_poly_gate_wide_bwd_kernel"}, log


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs the Triton interpreter")
@pytest.mark.parametrize("spatial, shape, fwd, bwd, programs", [
    (False, (35, 45), dict(BM=4, BC=16, num_warps=4), dict(BM=4, BC=16, num_warps=4), 3),
    (True, (1, 5, 6, 37), dict(BM=8, BC=32, num_warps=4), dict(BM=2, BC=16, num_warps=4), 2),
])
def test_triton_wide_tilings(monkeypatch, spatial, shape, fwd, bwd, programs):
    """The wide kernels at small C: ragged row tiles and channel chunks, several tiles per program."""
    from hadamard_kernels.ops.poly_gate import triton as triton_backend

    monkeypatch.setattr(triton_backend, "MAX_C", 8)
    test_triton_tilings(spatial, shape, fwd, bwd, programs)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
def test_unavailable_backend_raises_runtime_error():
    with pytest.raises(RuntimeError, match="backend 'cuda'.*not available"):
        hk.poly_gate(*make_inputs((2, 5), "none"), backend="cuda")


# ---------------------------------------------------------------- the survey's modules, in plain PyTorch
class SurveyPolyMlp(nn.Module):
    """Transcription of the survey's PolyMlp (MONet): U1, U2 (to hidden // 8), U3, C, norm1, norm3, alpha and the
    optional in-place spatial shift; kaiming-normal U weights, U biases set to one."""

    def __init__(self, in_features, hidden_features=None, out_features=None, bias=True, drop=0., use_conv=False,
                 n_degree=2, use_alpha=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_spatial=False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features or in_features
        self.hidden_features = hidden_features or in_features
        self.use_alpha = use_alpha
        self.use_spatial = use_spatial
        self.norm1 = norm_layer(self.hidden_features)
        self.norm3 = norm_layer(self.hidden_features)
        self.n_degree = n_degree
        self.U1 = nn.Linear(self.in_features, self.hidden_features, bias=bias)
        self.U2 = nn.Linear(self.in_features, self.hidden_features // 8, bias=bias)
        self.U3 = nn.Linear(self.hidden_features // 8, self.hidden_features, bias=bias)
        self.C = nn.Linear(self.hidden_features, self.out_features, bias=True)
        self.drop2 = nn.Dropout(drop)
        if self.use_spatial:
            self.spatial_shift = SurveySpatialShift()
        if self.use_alpha:
            self.alpha = nn.Parameter(torch.ones(1))
        nn.init.kaiming_normal_(self.U1.weight)
        nn.init.kaiming_normal_(self.U2.weight)
        nn.init.kaiming_normal_(self.U3.weight)
        if bias:
            nn.init.ones_(self.U1.bias)
            nn.init.ones_(self.U2.bias)
            nn.init.ones_(self.U3.bias)

    def forward(self, x):
        out1 = self.U1(x)
        out2 = self.U2(x)
        if self.use_spatial:
            out1 = self.spatial_shift(out1)
            out2 = self.spatial_shift(out2)
        out2 = self.U3(out2)
        out1 = self.norm1(out1)
        out2 = self.norm3(out2)
        out_so = out1 * out2
        if self.use_alpha:
            out1 = out1 + self.alpha * out_so
        else:
            out1 = out1 + out_so
        return self.C(out1)


class SurveyPolyBlock(nn.Module):
    """Transcription of the survey's PolyBlock: one LayerNorm, mlp1 with the spatial shift, mlp2 widened by
    expansion_factor, residuals."""

    def __init__(self, embed_dim, expansion_factor=3, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop=0.,
                 drop_path=0., n_degree=2):
        super().__init__()
        self.embed_dim = embed_dim
        self.expansion_factor = expansion_factor
        self.norm = norm_layer(self.embed_dim)
        self.drop_path = nn.Identity()
        self.mlp1 = SurveyPolyMlp(embed_dim, embed_dim, embed_dim, drop=drop, use_spatial=True)
        self.mlp2 = SurveyPolyMlp(embed_dim, embed_dim * expansion_factor, embed_dim, drop=drop, use_spatial=False)

    def forward(self, x):
        z = self.norm(x)
        z = self.mlp1(z)
        x = x + self.drop_path(z)
        z = self.norm(x)
        z = self.mlp2(z)
        return x + self.drop_path(z)


class FormulaShift(nn.Module):
    """The intended shift (shift_by_formula), swapped into a survey model to compare outputs (README "Modules")."""

    def forward(self, x):
        return shift_by_formula(x)


def with_intended_shift(model):
    for module in model.modules():
        if isinstance(module, SurveyPolyMlp) and module.use_spatial:
            module.spatial_shift = FormulaShift()
    return model


# Float32 agreement asked of a drop-in: outputs and every gradient within 1e-5 relative of the plain module.
DROP_IN_TOL = 1e-5
# hidden 200: U2 gives 25 channels, odd and not a multiple of 16 (shift groups 6, 6, 6, 7).
MLP_CONFIGS = {
    "spatial": (dict(in_features=16, hidden_features=200, out_features=12, use_spatial=True), (2, 5, 6, 16)),
    "plain": (dict(in_features=16, hidden_features=200, out_features=12), (3, 7, 16)),
    "no-alpha": (dict(in_features=16, hidden_features=64, use_alpha=False, use_spatial=True), (1, 4, 3, 16)),
    "no-bias": (dict(in_features=10, hidden_features=40, bias=False), (9, 10)),
}


def make_pair(kind, backend, seed=0):
    """(survey model with the intended shift, ours): ours loads the survey model's state_dict."""
    torch.manual_seed(seed)
    if kind == "block":
        theirs, ours = SurveyPolyBlock(24), hk.nn.PolyBlock(24, backend=backend)
        x_shape = (2, 4, 5, 24)  # mlp1: hidden 24, U2 gives 3 channels (the first shift group is empty)
    else:
        config, x_shape = MLP_CONFIGS[kind]
        theirs, ours = SurveyPolyMlp(**config), hk.nn.PolyMlp(**config, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(seed + 1))
    return with_intended_shift(theirs), ours, x


def module_forward_backward(model, x):
    """Output, input gradient and {name: gradient} of every parameter for a fixed random output gradient."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out))
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


def assert_models_match(ours, theirs, x, tol=DROP_IN_TOL):
    out, dx, grads = module_forward_backward(ours, x)
    ref_out, ref_dx, ref_grads = module_forward_backward(theirs, x)
    assert grads.keys() == ref_grads.keys()
    assert_close("out", out, ref_out, tol=tol)
    assert_close("dx", dx, ref_dx, tol=tol)
    for name, g in grads.items():
        assert g is not None, f"{name}: no gradient reached it"
        assert_close(f"d{name}", g, ref_grads[name], tol=tol)


KINDS = [*MLP_CONFIGS, "block"]


def _construct(kind, cls_pair):
    survey_cls, ours_cls = cls_pair
    if kind == "block":
        return survey_cls(24), ours_cls(24)
    config = MLP_CONFIGS[kind][0]
    return survey_cls(**config), ours_cls(**config)


def _classes(kind):
    return (SurveyPolyBlock, hk.nn.PolyBlock) if kind == "block" else (SurveyPolyMlp, hk.nn.PolyMlp)


@pytest.mark.parametrize("kind", KINDS)
def test_module_state_dict_round_trip(kind):
    """Same keys in the same order, and strict loading both ways."""
    theirs, ours = _construct(kind, _classes(kind))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    ours.load_state_dict(theirs.state_dict())
    back, _ = _construct(kind, _classes(kind))
    back.load_state_dict(ours.state_dict())
    for name, t in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


@pytest.mark.parametrize("kind", KINDS)
def test_module_same_seed_same_weights(kind):
    """Layers registered and initialised in the survey's order: one seed gives both the same weights."""
    survey_cls, ours_cls = _classes(kind)
    torch.manual_seed(3)
    theirs, _ = _construct(kind, (survey_cls, nn.Identity))
    torch.manual_seed(3)
    _, ours = _construct(kind, (nn.Identity, ours_cls))
    for name, t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name


def test_module_initialisation():
    torch.manual_seed(11)
    model = hk.nn.PolyMlp(256, 512, 128)
    assert torch.equal(model.alpha.detach(), torch.ones(1))
    for layer in (model.U1, model.U2, model.U3):
        assert torch.equal(layer.bias.detach(), torch.ones_like(layer.bias)), "U biases are set to one"
        w = layer.weight.detach()
        std = math.sqrt(2 / layer.in_features)  # kaiming normal, fan_in, gain sqrt(2)
        assert abs(w.std().item() - std) < 5 * std / math.sqrt(w.numel()) * 2
    assert model.U2.out_features == 64 and model.U3.in_features == 64
    assert torch.equal(model.norm1.weight.detach(), torch.ones(512))


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("kind", KINDS)
def test_module_outputs_and_grads_match_survey(backend, kind):
    theirs, ours, x = make_pair(kind, backend)
    assert_models_match(ours, theirs, x)


@pytest.mark.parametrize("kind", ["spatial", "block"])
def test_our_weights_load_into_survey_model(kind):
    torch.manual_seed(4)
    ours = hk.nn.PolyBlock(24, backend="reference") if kind == "block" else \
        hk.nn.PolyMlp(**MLP_CONFIGS[kind][0], backend="reference")
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the initial values
    theirs = SurveyPolyBlock(24) if kind == "block" else SurveyPolyMlp(**MLP_CONFIGS[kind][0])
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn((2, 4, 5, 24) if kind == "block" else MLP_CONFIGS[kind][1])
    assert_models_match(ours, with_intended_shift(theirs), x)


def test_module_float64_matches_to_rounding():
    theirs, ours, x = make_pair("block", "reference")
    assert_models_match(ours.double(), theirs.double(), x.double(), tol=1e-12)


def test_block_training_matches_survey_step_for_step():
    """A few SGD steps of PolyBlock: the survey model (intended shift) and every backend's model stay together."""
    runs = {}
    for backend in ["survey", *cpu_backends(torch.float32)]:
        theirs, ours, x = make_pair("block", None if backend == "survey" else backend)
        model = theirs if backend == "survey" else ours
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[backend] = (model, losses)
    ref_model, ref_losses = runs["survey"]
    assert ref_losses[-1] < ref_losses[0]
    for name, (model, losses) in runs.items():
        for step, (loss, ref_loss) in enumerate(zip(losses, ref_losses)):
            assert abs(loss - ref_loss) <= DROP_IN_TOL * abs(ref_loss), f"{name} step {step}: {loss} != {ref_loss}"
        for pname, p in model.state_dict().items():
            assert_close(f"{name} {pname} after training", p, ref_model.state_dict()[pname], tol=DROP_IN_TOL)


def test_module_compiles_fullgraph():
    _, ours, x = make_pair("spatial", "reference")
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out, dx, grads = module_forward_backward(compiled, x)
    ref_out, ref_dx, ref_grads = module_forward_backward(ours, x)
    assert_close("out", out, ref_out, tol=DROP_IN_TOL)
    assert_close("dx", dx, ref_dx, tol=DROP_IN_TOL)
    for name, g in ref_grads.items():
        assert_close(f"d{name}", grads[f"_orig_mod.{name}"], g, tol=DROP_IN_TOL)


def test_drop_path_only_in_training():
    block = hk.nn.PolyBlock(16, drop_path=0.5, backend="reference")
    x = torch.randn(8, 3, 3, 16)
    block.eval()
    assert torch.equal(block(x), block(x))
    block.train()
    torch.manual_seed(0)
    dropped = block.drop_path(torch.ones(64, 2))
    assert set(dropped.unique().tolist()) <= {0.0, 2.0} and 0 < dropped.sum() < 128


@pytest.mark.parametrize("make, error, match", [
    (lambda: hk.nn.PolyMlp(16, use_conv=True), NotImplementedError, "use_conv"),
    (lambda: hk.nn.PolyMlp(16, 4), ValueError, "hidden_features"),
    (lambda: hk.nn.PolyMlp(0), ValueError, "in_features"),
    (lambda: hk.nn.PolyMlp(16, 32, norm_layer=nn.BatchNorm1d), ValueError, "norm_layer"),
    (lambda: hk.nn.PolyBlock(16, expansion_factor=0), ValueError, "expansion_factor"),
])
def test_module_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_spatial_module_needs_images():
    model = hk.nn.PolyMlp(16, 32, use_spatial=True, backend="reference")
    with pytest.raises(ValueError, match="4 dims"):
        model(torch.randn(5, 16))


# ---------------------------------------------------------------- the CUDA C++ index and element math, host build
EXT, EXT_MISSING = _backend.cuda_extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"hadamard_kernels._C not built: {EXT_MISSING}")


@needs_ext
def test_cuda_limits_match_python():
    from hadamard_kernels.ops.poly_gate import cuda as cuda_backend

    assert EXT.POLY_GATE_MAX_C == cuda_backend.MAX_C


@needs_ext
@pytest.mark.parametrize("shape", [(2, 5, 7, 13), (1, 1, 4, 6), (1, 3, 1, 3), (1, 2, 2, 1), (1, 4, 3, 9)])
def test_cuda_shift_index_math(shape):
    """The kernels' row maps, run on the host: the shift read through shift_source_row is hk.spatial_shift, and the
    row permutation with its border sums is the shift's transpose."""
    B, W, H, C = shape
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B * W * H, C, generator=g, dtype=torch.float64)
    dy = torch.randn(B * W * H, C, generator=g, dtype=torch.float64)
    shifted, transposed = torch.empty_like(x), torch.full_like(dy, float("nan"))
    for row in range(B * W * H):
        for c in range(C):
            source, target, own, partner = EXT.poly_gate_shift_host(row, c, W, H, C)
            shifted[row, c] = x[source, c]
            assert math.isnan(transposed[target, c]), f"row {target} channel {c} written twice"
            transposed[target, c] = (dy[row, c] if own else 0.0) + (dy[partner, c] if partner >= 0 else 0.0)
    assert torch.equal(shifted.view(shape), hk.spatial_shift(x.view(shape)))
    assert_close("transpose", transposed.view(shape), common.spatial_shift_adjoint(dy.view(shape)), tol=1e-15)


@needs_ext
@pytest.mark.parametrize("n", range(1, 12))
def test_cuda_tile_order_keeps_border_pairs_together(n):
    """Tile positions cover the axis once, and pixels 0, 1 and n - 2, n - 1 share a tile (the backward sums them)."""
    tile = EXT.poly_gate_tile_pixel_host(0, n)[0]
    positions = range(-(-n // tile) * tile)
    pixels = [EXT.poly_gate_tile_pixel_host(k, n)[1] for k in positions]
    assert sorted(p for p in pixels if p >= 0) == list(range(n))
    tile_of = {p: k // tile for k, p in zip(positions, pixels) if p >= 0}
    if n >= 2:
        assert tile_of[0] == tile_of[1] and tile_of[n - 2] == tile_of[n - 1]
    from hadamard_kernels.ops.poly_gate import triton as triton_backend

    assert tile == triton_backend.axis_tile(n), "the Triton and CUDA backwards tile alike"


@needs_ext
def test_cuda_element_math_matches_autograd():
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        gy, n1, n2, alpha = (torch.randn((), generator=g, dtype=torch.float64) for _ in range(4))
        leaves = [t.clone().requires_grad_() for t in (n1, n2)]
        y = leaves[0] + alpha * leaves[0] * leaves[1]
        y.backward(gy)
        got = EXT.poly_gate_grads_host(gy.item(), n1.item(), n2.item(), alpha.item())
        for name, value, expected in zip(("y", "dn1", "dn2"), got, (y.item(), *(t.grad.item() for t in leaves))):
            assert value == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    # LayerNorm input gradient of one row, element by element, against autograd.
    x = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    weight, dn = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    xhat, rstd = (x - x.mean()) * torch.rsqrt(x.var(unbiased=False) + 1e-6), torch.rsqrt(x.var(unbiased=False) + 1e-6)
    (xhat * weight).backward(dn)
    dxhat = (dn * weight).detach()
    mean_dxhat, mean_dxhat_xhat = dxhat.mean().item(), (dxhat * xhat.detach()).mean().item()
    got = [EXT.poly_gate_layer_norm_input_grad_host(dxhat[i].item(), xhat[i].item(), rstd.item(), mean_dxhat,
                                                    mean_dxhat_xhat) for i in range(7)]
    assert_close("dx", torch.tensor(got, dtype=torch.float64), x.grad, tol=1e-6)


@needs_ext
def test_cuda_launcher_rejects_bad_params():
    """Refused before any launch (safe on a GPU too) and raised as RuntimeError."""
    params = EXT.PolyGateParams(a=256, b=256, ln1_weight=256, ln1_bias=256, ln2_weight=256, ln2_bias=256, y=256,
                                M=4, C=EXT.POLY_GATE_MAX_C + 1, a_row_stride=4096, b_row_stride=4096,
                                y_row_stride=4096, dtype=0)
    with pytest.raises(RuntimeError, match="poly_gate_fwd failed"):
        EXT.poly_gate_fwd(params, 0)
    params.C, params.spatial, params.W, params.H = 8, True, 3, 1  # M = 4 rows is not a whole number of 3 x 1 images
    with pytest.raises(RuntimeError, match="poly_gate_bwd failed"):
        EXT.poly_gate_bwd(params, 0)


# ---------------------------------------------------------------- GPU
GPU_SHAPES = [((4, 28, 28, 96), True), ((3, 7, 9, 100), True), ((2, 1, 5, 1152), True), ((1000, 576), False),
              ((5, 3, 2048), False)]


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, spatial", GPU_SHAPES)
def test_gpu_matches_reference(backend, dtype, shape, spatial):
    check_against_reference(make_inputs(shape, "scalar", dtype, "cuda"), backend, spatial_shift=spatial)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("alpha", ["none", "channel"])
def test_gpu_alpha_forms(backend, alpha):
    check_against_reference(make_inputs((2, 14, 14, 72), alpha, torch.bfloat16, "cuda"), backend, spatial_shift=True)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_block_matches_survey(backend):
    theirs, ours, x = make_pair("block", backend)
    theirs, ours, x = theirs.cuda(), ours.cuda(), x.cuda()
    assert_models_match(ours, theirs, x, tol=1e-4)


@cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, spatial", [((300, 16384), False), ((2, 5, 6, 8200), True)])
def test_gpu_triton_rows_past_max_c(dtype, shape, spatial):
    """Rows wider than the Triton kernels hold in registers: the chunked (wide) kernels."""
    check_against_reference(make_inputs(shape, "channel", dtype, "cuda"), "triton", spatial_shift=spatial)


@cuda
@requires_cuda
def test_gpu_auto_backend_and_compile():
    inputs = make_inputs((2, 8, 8, 64), "scalar", torch.bfloat16, "cuda")
    fn = torch.compile(lambda *t: hk.poly_gate(*t, spatial_shift=True), fullgraph=True)
    assert_close("y", fn(*inputs), hk.poly_gate(*[t.double() for t in inputs], spatial_shift=True))
