"""causal_linear_attention: the reference against the plain masked formula and the token recurrence, every backend
available here against the float64 reference (output, final state and every gradient), state hand-over, decoding,
packed sequences, bad input, and the LinearSelfAttention module."""

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
    forward_backward,
    gpu_backends,
    requires_cuda,
)

import hadamard_kernels as hk
from hadamard_kernels.ops.linear_attention.common import FEATURE_MAPS, state_dtype
from hadamard_kernels.ops.linear_attention.op import causal_linear_attention_op
from hadamard_kernels.ops.linear_attention.reference import phi

OUT_NAMES = ("o", "final_state", "final_key_sum")
GRAD_NAMES = ("dq", "dk", "dv", "d_initial_state", "d_initial_key_sum")


def make_inputs(B=2, T=100, H=2, Dk=20, Dv=12, *, dtype=torch.float64, device="cpu", states=True, n=None,
                feature_map="identity", normalize=False, seed=0):
    """q, k, v and (optionally) initial state and key sum. With normalize, q and k keep phi(q).phi(k) mostly
    positive so the normalizer stays away from 0 (the quotient is then well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = randn(B, T, H, Dk), randn(B, T, H, Dk), randn(B, T, H, Dv)
    if normalize and feature_map == "identity":
        q, k = q.abs(), k.abs()
    elif normalize and feature_map == "relu":
        q, k = q + 1, k + 1
    n = B if n is None else n
    S0 = randn(n, H, Dk, Dv) if states else None
    z0 = 1 + torch.rand(n, H, Dk, generator=g, dtype=torch.float64) if (states and normalize) else None
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    cast_state = lambda t: None if t is None else t.to(device=device, dtype=state_dtype(dtype))  # noqa: E731
    return [cast(q), cast(k), cast(v), cast_state(S0), cast_state(z0)]


def call(q, k, v, S0=None, z0=None, *, normalize=False, **options):
    """The op with output_final_state=True, returning the flat tuple (o, S[, z])."""
    initial = None if S0 is None else ((S0, z0) if normalize else S0)
    o, state = hk.causal_linear_attention(q, k, v, normalize=normalize, initial_state=initial,
                                          output_final_state=True, **options)
    return (o, *state) if normalize else (o, state)


def run(inputs, grads_out=None, cu_seqlens=None, **options):
    """Outputs and gradients on leaf copies; the backend's own kernels are asserted to run, forward and backward."""
    fn = lambda *t: call(*t, cu_seqlens=cu_seqlens, **options)  # noqa: E731
    return forward_backward(fn, inputs, grads_out, backend=options.get("backend"))


def check_against_reference(inputs, backend, cu_seqlens=None, tol=None, **options):
    """`backend` on the inputs against the reference on their float64 copies: outputs and every gradient."""
    outs, grads, grads_out = run(inputs, cu_seqlens=cu_seqlens, backend=backend, **options)
    ref_outs, ref_grads, _ = run([None if t is None else t.double() for t in inputs], [g.double() for g in grads_out],
                                 cu_seqlens=cu_seqlens, backend="reference", **options)
    dtype = inputs[0].dtype
    for name, out, ref in zip(OUT_NAMES, outs, ref_outs):
        assert_close(name, out, ref, dtype, tol)
    for name, grad, ref in zip(GRAD_NAMES, grads, ref_grads):
        if ref is not None:
            assert_close(name, grad, ref, dtype, tol)
    return outs, grads


# ---------------------------------------------------------------- the reference against two naive forms
def masked_formula(q, k, v, feature_map, normalize, scale, eps):
    """((phi(Q) phi(K)^T) ∘ M) V with the T x T matrix, as the survey writes it (no initial state)."""
    Q, K = phi(q, feature_map), phi(k, feature_map)
    scores = torch.einsum("bthd,bshd->bhts", Q, K).tril()
    out = torch.einsum("bhts,bshv->bthv", scores, v)
    if normalize:
        out = out / (scores.sum(-1).transpose(1, 2)[..., None] + eps)
    return scale * out


def token_recurrence(q, k, v, S0, z0, feature_map, normalize, scale, eps):
    """S_t = S_{t-1} + phi(k_t)^T v_t, z_t = z_{t-1} + phi(k_t), o_t = scale * phi(q_t) S_t [/ (phi(q_t).z_t + eps)]."""
    Q, K = phi(q, feature_map), phi(k, feature_map)
    S, z, outs = S0.clone(), z0.clone(), []
    for t in range(q.shape[1]):
        S = S + torch.einsum("bhk,bhv->bhkv", K[:, t], v[:, t])
        z = z + K[:, t]
        o = torch.einsum("bhk,bhkv->bhv", Q[:, t], S)
        if normalize:
            o = o / (torch.einsum("bhk,bhk->bh", Q[:, t], z)[..., None] + eps)
        outs.append(scale * o)
    return torch.stack(outs, 1), S, z


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_reference_matches_masked_formula(feature_map, normalize):
    q, k, v, _, _ = make_inputs(T=150, feature_map=feature_map, normalize=normalize, states=False)
    o = hk.causal_linear_attention(q, k, v, feature_map=feature_map, normalize=normalize, scale=0.7,
                                   backend="reference")
    assert_close("o", o, masked_formula(q, k, v, feature_map, normalize, 0.7, 1e-6), tol=1e-12)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_reference_matches_token_recurrence(feature_map, normalize):
    q, k, v, S0, z0 = make_inputs(T=150, feature_map=feature_map, normalize=True)
    outs = call(q, k, v, S0, z0, normalize=normalize, feature_map=feature_map, scale=0.6, backend="reference")
    expected = token_recurrence(q, k, v, S0, z0, feature_map, normalize, 0.6, 1e-6)
    for name, out, ref in zip(OUT_NAMES, outs, expected):
        assert_close(name, out, ref, tol=1e-12)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_reference_gradcheck(feature_map, normalize):
    """T = 70 crosses a 64-token chunk; a nonzero gradient reaches the final state too."""
    inputs = make_inputs(B=1, T=70, H=2, Dk=3, Dv=2, feature_map=feature_map, normalize=normalize)
    inputs = [t.requires_grad_() if t is not None else None for t in inputs]
    fn = lambda *t: call(*t, normalize=normalize, feature_map=feature_map, scale=0.8, backend="reference")  # noqa
    # fast_mode: checks the Jacobian along random directions (the full one takes minutes through the chunk loop).
    assert torch.autograd.gradcheck(fn, [t for t in inputs if t is not None] if normalize else inputs[:4],
                                    fast_mode=True)


# ---------------------------------------------------------------- fused backends on this machine
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference(backend, dtype, feature_map, normalize):
    if backend not in cpu_backends(dtype):
        pytest.skip(f"{backend} does not run {dtype} on the CPU")
    inputs = make_inputs(dtype=dtype, feature_map=feature_map, normalize=normalize)
    check_against_reference(inputs, backend, feature_map=feature_map, normalize=normalize, scale=0.5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", [
    dict(B=1, T=1, H=1, Dk=1, Dv=1),      # smallest
    dict(B=2, T=63, H=3, Dk=7, Dv=5),     # chunk - 1
    dict(B=1, T=64, H=2, Dk=16, Dv=16),   # one full chunk
    dict(B=1, T=65, H=2, Dk=9, Dv=11),    # chunk + 1
    dict(B=1, T=130, H=1, Dk=60, Dv=100),  # head dims not multiples of 16, past two chunks
    dict(B=3, T=20, H=5, Dk=33, Dv=1),    # odd H, one value column
])
@pytest.mark.parametrize("normalize", [False, True])
def test_shapes(backend, shape, normalize):
    inputs = make_inputs(**shape, feature_map="elu1", normalize=normalize)
    # With Dk = 1 and normalize, phi(q) cancels between numerator and denominator but for eps: dq is O(eps) left from
    # O(1) terms, so float64 rounding (the reference's as much as the kernel's) is ~1e-9 of it; a wrong term is
    # off by O(1 / eps).
    tol = 1e-8 if normalize and shape["Dk"] == 1 else None
    check_against_reference(inputs, backend, tol=tol, feature_map="elu1", normalize=normalize)


@pytest.mark.parametrize("backend", cpu_backends())
def test_without_initial_state(backend):
    inputs = make_inputs(T=70, states=False, feature_map="relu", normalize=True)
    check_against_reference(inputs, backend, feature_map="relu", normalize=True)
    o = hk.causal_linear_attention(*inputs[:3], feature_map="relu", backend=backend)
    assert_close("o alone", o, hk.causal_linear_attention(*inputs[:3], feature_map="relu", backend="reference"))


# ---------------------------------------------------------------- packed sequences
CU_SEQLENS = [0, 5, 5, 70, 135]  # an empty sequence, lengths not multiples of 64, one crossing a chunk


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("normalize", [False, True])
def test_varlen_matches_reference_and_separate_calls(backend, normalize):
    n = len(CU_SEQLENS) - 1
    inputs = make_inputs(B=1, T=CU_SEQLENS[-1], n=n, feature_map="elu1", normalize=normalize)
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    options = dict(feature_map="elu1", normalize=normalize, scale=0.9)
    outs, grads = check_against_reference(inputs, backend, cu_seqlens=cu, **options)
    q, k, v, S0, z0 = inputs
    for i, (start, end) in enumerate(zip(CU_SEQLENS[:-1], CU_SEQLENS[1:])):
        piece = call(q[:, start:end], k[:, start:end], v[:, start:end], S0[i:i + 1],
                     None if z0 is None else z0[i:i + 1], backend="reference", **options)
        assert_close(f"o of sequence {i}", outs[0][:, start:end], piece[0], tol=1e-10)
        for name, out, ref in zip(OUT_NAMES[1:], outs[1:], piece[1:]):
            assert_close(f"{name} of sequence {i}", out[i:i + 1], ref, tol=1e-10)


# ---------------------------------------------------------------- training in pieces and decoding
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("normalize", [False, True])
def test_state_handover_equals_one_pass(backend, normalize):
    """Two pieces with the state handed over give the outputs and gradients of one pass (gradients flow back
    through the handed-over state)."""
    inputs = make_inputs(T=150, feature_map="elu1", normalize=normalize)
    options = dict(feature_map="elu1", normalize=normalize, backend=backend)
    whole, whole_grads, grads_out = run(inputs, **options)

    def in_pieces(q, k, v, S0, z0):
        first = call(q[:, :70], k[:, :70], v[:, :70], S0, z0, **options)
        second = call(q[:, 70:], k[:, 70:], v[:, 70:], *first[1:], **options)
        return (torch.cat([first[0], second[0]], 1), *second[1:])

    pieces, piece_grads, _ = forward_backward(in_pieces, inputs, grads_out, backend=backend)
    for name, a, b in zip(OUT_NAMES, pieces, whole):
        assert_close(name, a, b, tol=1e-10)
    for name, a, b in zip(GRAD_NAMES, piece_grads, whole_grads):
        if b is not None:
            assert_close(name, a, b, tol=1e-10)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("normalize", [False, True])
def test_decode_steps_equal_chunked(backend, normalize):
    q, k, v, S0, z0 = make_inputs(B=2, T=12, H=3, Dk=5, Dv=4, feature_map="relu", normalize=normalize)
    options = dict(feature_map="relu", normalize=normalize, scale=0.5)
    whole = call(q, k, v, S0, z0, backend="reference", **options)
    state = (S0, z0) if normalize else S0
    for t in range(q.shape[1]):
        o_t, state = hk.causal_linear_attention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state,
                                                     backend=backend, **options)
        assert_close(f"o at step {t}", o_t, whole[0][:, t:t + 1], tol=1e-10)
    for name, out, ref in zip(OUT_NAMES[1:], state if normalize else (state,), whole[1:]):
        assert_close(name, out, ref, tol=1e-10)


# ---------------------------------------------------------------- special values
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_nan_propagates_like_reference(backend, feature_map):
    """A NaN in q poisons exactly its own output row, a NaN in k its own row and every later one of its head. A NaN
    in v also reaches the earlier rows of its 64-token chunk (masked scores are 0, and 0 * NaN is NaN in the chunk's
    matrix product), as in every chunked kernel: docs/decisions.md."""
    q, k, v, S0, _ = make_inputs(T=150, feature_map=feature_map)
    q[0, 10, 1, 3] = float("nan")
    k[1, 70, 0, 2] = float("nan")
    v[0, 100, 0, 4] = float("nan")
    check_against_reference([q, k, v, S0, None], backend, feature_map=feature_map)
    o = hk.causal_linear_attention(q, k, v, feature_map=feature_map, backend=backend)
    nan = torch.isnan(o).any(-1)
    assert nan[0, 10, 1] and nan[0, :, 1].sum() == 1, "a NaN in q reaches its own row only"
    assert nan[1, 70:, 0].all() and not nan[1, :70].any(), "a NaN in k reaches its row and the later ones"
    assert nan[0, 64:, 0].all() and not nan[0, :64, 0].any(), "a NaN in v reaches its chunk and the later ones"


def test_bfloat16_elu1_normalize_long_sequence_stays_finite():
    """The key sum grows like T; kept in fp32 it neither overflows nor loses the normalizer (bf16 inputs)."""
    q, k, v, _, _ = make_inputs(B=1, T=8192, H=1, Dk=16, Dv=16, states=False, dtype=torch.bfloat16)
    o, (S, z) = hk.causal_linear_attention(q, k, v, feature_map="elu1", normalize=True, output_final_state=True,
                                           backend="reference")
    assert torch.isfinite(o).all() and z.dtype == torch.float32 and z.min() > 0
    exact = hk.causal_linear_attention(q.double(), k.double(), v.double(), feature_map="elu1", normalize=True)
    assert_close("o", o, exact, torch.bfloat16)


# ---------------------------------------------------------------- torch.library and compile
@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck(backend):
    inputs = make_inputs(B=1, T=20, H=1, Dk=3, Dv=2, feature_map="elu1", normalize=True)
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda *t: call(*t, normalize=True, feature_map="elu1", scale=0.8, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    q, k, v, S0, z0 = make_inputs(B=1, T=9, H=2, Dk=3, Dv=2, normalize=True, feature_map="elu1")
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    S0, z0 = S0.repeat(2, 1, 1, 1), z0.repeat(2, 1, 1)
    for args in [(q, k, v, None, None, "relu", False, 0.5, 1e-6, False, None, backend),
                 (q, k, v, S0, z0, "elu1", True, 1.0, 1e-6, True, cu, backend)]:
        args = [t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
        torch.library.opcheck(causal_linear_attention_op, args)


def test_torch_compile_fullgraph():
    q, k, v, S0, _ = make_inputs(B=1, T=30, H=2, Dk=4, Dv=3, dtype=torch.float32)
    fn = lambda *t: call(*t, feature_map="elu1")  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (q, k, v, S0)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    (out[0].square().sum() + out[1].sum()).backward()
    expected = [t.clone().requires_grad_() for t in (q, k, v, S0)]
    ref = fn(*expected)
    (ref[0].square().sum() + ref[1].sum()).backward()
    for name, a, b in zip(GRAD_NAMES, leaves, expected):
        assert_close(name, a.grad, b.grad.double())


# ---------------------------------------------------------------- bad input
def _bad(change):
    q, k, v, S0, z0 = make_inputs(B=1, T=6, H=2, Dk=3, Dv=2, normalize=True)
    args = dict(q=q, k=k, v=v, feature_map="identity", normalize=True, scale=1.0, eps=1e-6,
                initial_state=(S0, z0), output_final_state=False, cu_seqlens=None, backend="reference")
    change(args)
    return args


@pytest.mark.parametrize("change, argument", [
    (lambda a: a.update(q=a["q"][..., :-1]), "k"),
    (lambda a: a.update(q=a["q"][0]), "q"),
    (lambda a: a.update(q=a["q"].to(torch.int64)), "q"),
    (lambda a: a.update(k=a["k"].float()), "k"),
    (lambda a: a.update(v=a["v"][:, :-1]), "v"),
    (lambda a: a.update(v=a["v"][..., :0]), r"v.shape\[3\]"),
    (lambda a: a.update(v=[1.0]), "v"),
    (lambda a: a.update(feature_map="softmax"), "feature_map"),
    (lambda a: a.update(normalize=1), "normalize"),
    (lambda a: a.update(scale=float("nan")), "scale"),
    (lambda a: a.update(eps=-1.0), "eps"),
    (lambda a: a.update(output_final_state="yes"), "output_final_state"),
    (lambda a: a.update(initial_state=a["initial_state"][0]), "initial_state"),
    (lambda a: a.update(initial_state=(a["initial_state"][0][..., :1], a["initial_state"][1])), "initial_state"),
    (lambda a: a.update(initial_state=(a["initial_state"][0].float(), a["initial_state"][1])), "initial_state"),
    (lambda a: a.update(initial_state=(a["initial_state"][0], a["initial_state"][1][:, :1])), "initial_key_sum"),
    (lambda a: a.update(normalize=False), "initial_state"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 6], dtype=torch.int64)), "cu_seqlens"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32)), "cu_seqlens"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens"),
    (lambda a: a.update(cu_seqlens=torch.tensor([[0, 6]], dtype=torch.int32)), "cu_seqlens"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), initial_state=None,
                        q=a["q"].repeat(2, 1, 1, 1), k=a["k"].repeat(2, 1, 1, 1), v=a["v"].repeat(2, 1, 1, 1)),
     "batch size 1"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), "initial_state"),
    (lambda a: a.update(backend="gpu"), "backend"),
])
def test_bad_input_raises_value_error(change, argument):
    args = _bad(change)
    with pytest.raises(ValueError, match=argument):
        hk.causal_linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_step_needs_one_token():
    q, k, v, S0, _ = make_inputs(B=1, T=2, H=1, Dk=2, Dv=2)
    with pytest.raises(ValueError, match="one token"):
        hk.causal_linear_attention_step(q, k, v, S0)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
def test_unavailable_backend_raises_runtime_error():
    q, k, v, _, _ = make_inputs(B=1, T=3, H=1, Dk=2, Dv=2)
    with pytest.raises(RuntimeError, match="backend 'cuda'.*not available"):
        hk.causal_linear_attention(q, k, v, backend="cuda")


def test_empty_sequence():
    q, k, v, S0, _ = make_inputs(B=2, T=0, H=1, Dk=2, Dv=3)
    outs, grads, _ = forward_backward(lambda *t: call(*t, backend="reference"), [q, k, v, S0, None],
                                      backend="reference")
    assert outs[0].shape == (2, 0, 1, 3)
    assert_close("final_state", outs[1], S0, tol=0.0 + 1e-300)
    assert grads[0].shape == q.shape and grads[3].shape == S0.shape


# ---------------------------------------------------------------- the module
class SurveyLinearSelfAttention(nn.Module):
    """Transcription of the survey's instructional causal linear self-attention (arXiv 2504.13112, §S.2)."""

    def __init__(self, hidden_dim):
        super().__init__()
        self.W_q = nn.Linear(hidden_dim, hidden_dim)
        self.W_k = nn.Linear(hidden_dim, hidden_dim)
        self.W_v = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        Q, K, V = self.W_q(x), self.W_k(x), self.W_v(x)
        attn = torch.bmm(Q, K.transpose(1, 2))
        mask = torch.tril(torch.ones(x.shape[1], x.shape[1], device=x.device, dtype=x.dtype))
        return torch.bmm(attn * mask, V)


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_module_is_a_drop_in_for_the_survey(backend):
    torch.manual_seed(0)
    theirs = SurveyLinearSelfAttention(24)
    torch.manual_seed(0)
    ours = hk.nn.LinearSelfAttention(24, backend=backend)
    for name, p in theirs.state_dict().items():  # same seed, same construction order: same weights
        assert torch.equal(p, ours.state_dict()[name]), name
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 70, 24)
    outs, grads, grads_out = forward_backward(ours, [x], backend=backend)
    ref_outs, ref_grads, _ = forward_backward(theirs, [x], grads_out, backend="reference")
    assert_close("out", outs[0], ref_outs[0].double(), tol=1e-5)
    assert_close("dx", grads[0], ref_grads[0].double(), tol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_module_decodes_token_by_token(normalize):
    torch.manual_seed(1)
    module = hk.nn.LinearSelfAttention(12, num_heads=3, feature_map="elu1", normalize=normalize).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    whole, final = module(x, output_final_state=True)
    prefix, state = module(x[:, :4], output_final_state=True)
    outs = [prefix]
    for t in range(4, 9):
        o_t, state = module.step(x[:, t], state)
        outs.append(o_t[:, None])
    assert_close("out", torch.cat(outs, 1), whole, tol=1e-12)
    for a, b in zip(state if normalize else (state,), final if normalize else (final,)):
        assert_close("state", a, b, tol=1e-12)


@pytest.mark.parametrize("make, argument", [
    (lambda: hk.nn.LinearSelfAttention(10, num_heads=3), "hidden_dim"),
    (lambda: hk.nn.LinearSelfAttention(0), "hidden_dim"),
    (lambda: hk.nn.LinearSelfAttention(8, feature_map="exp"), "feature_map"),
    (lambda: hk.nn.LinearSelfAttention(8)(torch.randn(2, 8)), "x"),
])
def test_module_bad_arguments(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


# ---------------------------------------------------------------- GPU
GPU_SHAPES = [dict(B=2, T=63, H=3, Dk=60, Dv=100), dict(B=1, T=1000, H=4, Dk=64, Dv=64),
              dict(B=1, T=130, H=2, Dk=256, Dv=256), dict(B=3, T=1, H=2, Dk=16, Dv=16)]


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_matches_reference(backend, dtype, feature_map, normalize):
    inputs = make_inputs(B=2, T=200, H=3, Dk=64, Dv=48, dtype=dtype, device="cuda", feature_map=feature_map,
                         normalize=normalize)
    check_against_reference(inputs, backend, feature_map=feature_map, normalize=normalize, scale=0.5)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_shapes(backend, dtype, shape):
    inputs = make_inputs(**shape, dtype=dtype, device="cuda", feature_map="elu1", normalize=True)
    check_against_reference(inputs, backend, feature_map="elu1", normalize=True)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_varlen_and_decode(backend):
    n = len(CU_SEQLENS) - 1
    inputs = make_inputs(B=1, T=CU_SEQLENS[-1], n=n, dtype=torch.bfloat16, device="cuda", feature_map="elu1",
                         normalize=True)
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32, device="cuda")
    check_against_reference(inputs, backend, cu_seqlens=cu, feature_map="elu1", normalize=True)
    q, k, v, S0, z0 = make_inputs(B=2, T=5, H=4, Dk=64, Dv=64, dtype=torch.bfloat16, device="cuda",
                                  feature_map="elu1", normalize=True)
    whole = call(q, k, v, S0, z0, feature_map="elu1", normalize=True, backend="reference")
    state = (S0, z0)
    for t in range(5):
        o_t, state = hk.causal_linear_attention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state,
                                                     feature_map="elu1", normalize=True, backend=backend)
        assert_close(f"o at step {t}", o_t, whole[0][:, t:t + 1].double(), torch.bfloat16)


@pytest.mark.parametrize("feature_map, normalize", [("identity", False), ("relu", True)])
def test_double_backward_with_packed_sequences(feature_map, normalize):
    """Gradients of gradients (create_graph=True) through packed sequences that cross a chunk boundary, with
    initial states: gradgradcheck of the reference backward, which such a backward runs on every backend."""
    q, k, v, S0, z0 = make_inputs(B=1, T=70, H=1, Dk=3, Dv=2, n=2, feature_map=feature_map, normalize=normalize)
    cu = torch.tensor([0, 66, 70], dtype=torch.int32)
    leaves = [t.requires_grad_() for t in (q, k, v, S0, z0) if t is not None]  # z0: with normalize only
    fn = lambda *t: call(*t, cu_seqlens=cu, feature_map=feature_map, normalize=normalize,  # noqa: E731
                         backend="reference")
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


def test_cu_seqlens_values_are_not_read_during_cuda_graph_capture(monkeypatch):
    """A host read of a device tensor is an error while a CUDA graph is captured, so the check then leaves
    cu_seqlens' values alone (the eager warm-up call a capture needs checked them) but still checks the rest."""
    from hadamard_kernels.ops.linear_attention import common

    q = torch.zeros(1, 10, 1, 4)
    decreasing = torch.tensor([0, 7, 3, 10], dtype=torch.int32)
    assert not common._capturing_cuda_graph(q)  # CPU tensors are never captured
    with pytest.raises(ValueError, match="non-decreasing"):
        common.check_cu_seqlens(decreasing, q)
    monkeypatch.setattr(common, "_capturing_cuda_graph", lambda t: True)
    assert common.check_cu_seqlens(decreasing, q) == 3
    with pytest.raises(ValueError, match="cu_seqlens"):
        common.check_cu_seqlens(decreasing.long(), q)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_cuda_graphs_of_packed_sequences_and_of_a_decode_step(backend):
    """Packed sequences (cu_seqlens) and a decoding step, each captured in a CUDA graph: replays give the eager
    results, and a decode graph replayed token by token (its state copied back between replays, as a serving loop
    does) gives the chunked op's outputs."""
    n = len(CU_SEQLENS) - 1
    q, k, v, S0, z0 = make_inputs(B=1, T=CU_SEQLENS[-1], n=n, dtype=torch.float32, device="cuda",
                                  feature_map="elu1", normalize=True)
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32, device="cuda")
    packed = lambda: call(q, k, v, S0, z0, cu_seqlens=cu, feature_map="elu1", normalize=True,  # noqa: E731
                          backend=backend)
    graph, captured = capture_cuda_graph(packed)
    q.copy_(torch.randn_like(q))
    graph.replay()
    for name, out, ref in zip(OUT_NAMES, captured, packed()):
        assert_close(f"packed {name}", out, ref.double(), torch.float32)

    q, k, v, S0, z0 = make_inputs(B=2, T=6, H=4, Dk=64, Dv=48, dtype=torch.float32, device="cuda",
                                  feature_map="elu1", normalize=True)
    whole = call(q, k, v, S0, z0, feature_map="elu1", normalize=True, backend="reference")
    token = [t[:, :1].clone() for t in (q, k, v)]
    state = (S0.clone(), z0.clone())
    decode = lambda: hk.causal_linear_attention_step(*token, state, feature_map="elu1",  # noqa: E731
                                                     normalize=True, backend=backend)
    graph, (o_t, (S_t, z_t)) = capture_cuda_graph(decode)
    for t in range(q.shape[1]):
        for static, values in zip(token, (q, k, v)):
            static.copy_(values[:, t:t + 1])
        graph.replay()
        assert_close(f"decoded o at token {t}", o_t, whole[0][:, t:t + 1].double(), torch.float32)
        state[0].copy_(S_t)
        state[1].copy_(z_t)
    assert_close("decoded final state", state[0], whole[1].double(), torch.float32)
    assert_close("decoded final key sum", state[1], whole[2].double(), torch.float32)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_bfloat16_elu1_normalize_long_sequence(backend):
    q, k, v, _, _ = make_inputs(B=1, T=65536, H=2, Dk=64, Dv=64, states=False, dtype=torch.bfloat16, device="cuda")
    o = hk.causal_linear_attention(q, k, v, feature_map="elu1", normalize=True, backend=backend)
    assert torch.isfinite(o).all()
    exact = hk.causal_linear_attention(q.double(), k.double(), v.double(), feature_map="elu1", normalize=True)
    assert_close("o", o, exact, torch.bfloat16)
