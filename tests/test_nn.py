"""hk.nn modules: drop-in compatibility with the survey's CCP / NCP code, training, and the general chain layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from utils import REL_TOL, assert_close, cpu_backends, cuda, dispatched_ops, gpu_backends, rel_err, requires_cuda
from utils import forward_backward as forward_backward_checked

import hadamard_kernels as hk

# Float32 agreement asked of a drop-in: outputs and every gradient within 1e-5 relative of the plain module.
DROP_IN_TOL = 1e-5


# ---------------------------------------------------------------- the survey's classes, in plain PyTorch
class SurveyCCP(nn.Module):
    """Transcription of the survey's instructional CCP (arXiv 2504.13112, §S.2): one nn.Linear per degree."""

    def __init__(self, hidden_size=16, image_size=28, channels_in=1, n_degree=4, bias=True, n_classes=10):
        super().__init__()
        self.total_image_size = image_size * image_size * channels_in
        self.n_degree = n_degree
        for i in range(1, n_degree + 1):
            setattr(self, f"U{i}", nn.Linear(self.total_image_size, hidden_size, bias=bias))
        self.fc_out = nn.Linear(hidden_size, n_classes, bias=True)

    def forward(self, z):
        h = z.view(-1, self.total_image_size)
        out = self.U1(h)
        for i in range(2, self.n_degree + 1):
            out = getattr(self, f"U{i}")(h) * out + out
        return self.fc_out(out)


class SurveyNCP(nn.Module):
    """Transcription of the survey's instructional NCP: A_i on the input, S_i on the running output."""

    def __init__(self, hidden_size=16, image_size=28, channels_in=1, n_degree=4, bias=True, n_classes=10):
        super().__init__()
        self.total_image_size = image_size * image_size * channels_in
        self.n_degree = n_degree
        for i in range(1, n_degree + 1):
            setattr(self, f"A{i}", nn.Linear(self.total_image_size, hidden_size, bias=bias))
            if i > 1:
                setattr(self, f"S{i}", nn.Linear(hidden_size, hidden_size, bias=True))
        self.fc_out = nn.Linear(hidden_size, n_classes, bias=True)

    def forward(self, z):
        h = z.view(-1, self.total_image_size)
        out = self.A1(h)
        for i in range(2, self.n_degree + 1):
            out = getattr(self, f"A{i}")(h) * getattr(self, f"S{i}")(out)
        return self.fc_out(out)


PAIRS = {"ccp": (SurveyCCP, hk.nn.CCP), "ncp": (SurveyNCP, hk.nn.NCP)}
# Interpreter-sized models: d = 2 * 6 * 6 = 72 inputs, 16 hidden units.
SMALL = dict(hidden_size=16, image_size=6, channels_in=2, n_degree=4, n_classes=10)


def make_pair(family, backend, seed=0, dtype=torch.float32, device="cpu", **config):
    """(survey model, our model) holding the same weights: ours loads the survey model's state_dict."""
    survey_cls, ours_cls = PAIRS[family]
    torch.manual_seed(seed)
    theirs = survey_cls(**config).to(device=device, dtype=dtype)
    ours = ours_cls(**config, backend=backend).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def images(config, batch=8, seed=1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    size, channels = config["image_size"], config["channels_in"]
    return torch.randn(batch, channels, size, size, generator=g).to(device=device, dtype=dtype)


def forward_backward(model, x, grad_seed=2, grad_dtype=torch.float32):
    """Output, input gradient and {name: gradient} of every parameter for a fixed random output gradient (drawn in
    float32 and rounded to `grad_dtype`, so a float64 model can be given exactly the bf16 gradient)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(grad_dtype).to(out)
    out.backward(g)
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


def assert_models_match(ours, theirs, x, tol):
    out, dx, grads = forward_backward(ours, x)
    ref_out, ref_dx, ref_grads = forward_backward(theirs, x)
    assert grads.keys() == ref_grads.keys()
    assert_close("logits", out, ref_out, tol=tol)
    assert_close("dx", dx, ref_dx, tol=tol)
    for name, g in grads.items():
        assert g is not None, f"{name}: no gradient reached it"
        assert_close(f"d{name}", g, ref_grads[name], tol=tol)


# ---------------------------------------------------------------- drop-in compatibility
@pytest.mark.parametrize("family", PAIRS)
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys_and_round_trip(family, bias):
    survey_cls, ours_cls = PAIRS[family]
    theirs, ours = survey_cls(**SMALL, bias=bias), ours_cls(**SMALL, bias=bias)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict both ways
    back = survey_cls(**SMALL, bias=bias)
    back.load_state_dict(ours.state_dict())
    for name, t in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


@pytest.mark.parametrize("family", PAIRS)
def test_same_seed_same_initial_weights(family):
    """Submodules are registered in the survey's order, so one seed initialises both identically."""
    survey_cls, ours_cls = PAIRS[family]
    torch.manual_seed(3)
    theirs = survey_cls(**SMALL)
    torch.manual_seed(3)
    ours = ours_cls(**SMALL)
    for name, t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name


@pytest.mark.parametrize("family", PAIRS)
def test_default_constructor_matches_survey(family):
    theirs, ours = make_pair(family, "reference")  # hidden 16, 28x28x1 images, degree 4, 10 classes
    first = ours.U1 if family == "ccp" else ours.A1
    assert (first.in_features, first.out_features, ours.n_degree, ours.fc_out.out_features) == (784, 16, 4, 10)
    assert_models_match(ours, theirs, images(dict(image_size=28, channels_in=1), batch=5), DROP_IN_TOL)


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("family", PAIRS)
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_and_grads_match_survey(backend, family, bias):
    theirs, ours = make_pair(family, backend, **SMALL, bias=bias)
    assert_models_match(ours, theirs, images(SMALL), DROP_IN_TOL)


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("family", PAIRS)
def test_degree_one(family, backend):
    """n_degree = 1: a linear model (NCP passes empty S tensors to poly_ncp)."""
    config = dict(SMALL, n_degree=1)
    theirs, ours = make_pair(family, backend, **config)
    assert_models_match(ours, theirs, images(config), DROP_IN_TOL)


@pytest.mark.parametrize("family", PAIRS)
def test_our_weights_load_into_survey_model(family):
    """The other direction: a model trained with ours runs in the survey's code with the same outputs."""
    torch.manual_seed(4)
    ours = PAIRS[family][1](**SMALL, backend="reference")
    theirs = PAIRS[family][0](**SMALL)
    theirs.load_state_dict(ours.state_dict())
    assert_models_match(ours, theirs, images(SMALL), DROP_IN_TOL)


def test_float64_matches_to_rounding():
    theirs, ours = make_pair("ncp", "reference", dtype=torch.float64, **SMALL)
    assert_models_match(ours, theirs, images(SMALL, dtype=torch.float64), REL_TOL[torch.float64])


# ---------------------------------------------------------------- training
def sgd_losses(model, steps=4, lr=0.05, seed=5):
    """Losses of a few full-batch SGD steps of cross-entropy on fixed random images and labels."""
    data = images(SMALL, batch=32, seed=seed)
    labels = torch.randint(0, SMALL["n_classes"], (32,), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", PAIRS)
def test_training_matches_reference_step_for_step(family):
    backends = [b for b in cpu_backends(torch.float32) if b != "reference"]
    if not backends:
        pytest.skip("no fused backend runs here (set TRITON_INTERPRET=1)")
    theirs, reference = make_pair(family, "reference", **SMALL)
    runs = {"survey": (theirs, sgd_losses(theirs)), "reference": (reference, sgd_losses(reference))}
    for backend in backends:
        _, model = make_pair(family, backend, **SMALL)
        runs[backend] = (model, sgd_losses(model))
    ref_model, ref_losses = runs["reference"]
    for name, (model, losses) in runs.items():
        assert losses[-1] < losses[0], f"{name}: loss did not decrease: {losses}"
        for step, (loss, ref_loss) in enumerate(zip(losses, ref_losses)):
            assert abs(loss - ref_loss) <= DROP_IN_TOL * abs(ref_loss), f"{name} step {step}: {loss} != {ref_loss}"
        for pname, p in model.state_dict().items():
            assert_close(f"{name} {pname} after training", p, ref_model.state_dict()[pname], tol=DROP_IN_TOL)


# ---------------------------------------------------------------- PolyChain / ProductChain
def test_poly_chain_shapes_and_parameters():
    layer = hk.nn.PolyChain(7, 5, degree=3, mode="product", activation="tanh", scale=0.5)
    assert layer.weight.shape == (3, 5, 7) and layer.bias.shape == (3, 5)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer(torch.randn(2, 4, 6, 7)).shape == (2, 4, 6, 5)
    assert layer(torch.randn(7)).shape == (5,)
    no_bias = hk.nn.PolyChain(7, 5, degree=2, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    assert "degree=3" in repr(layer) and "'product'" in repr(layer)


def test_poly_chain_init_like_linear():
    torch.manual_seed(9)
    layer = hk.nn.PolyChain(400, 300, degree=4)
    bound = 1 / math.sqrt(400)
    std = bound / math.sqrt(3)  # of U(-bound, bound)
    for name, t in (("weight", layer.weight.detach()), ("bias", layer.bias.detach())):
        assert t.abs().max() <= bound, name
        # Five standard errors of the sample mean and (roughly) of the sample std.
        assert abs(t.mean().item()) < 5 * std / math.sqrt(t.numel()), f"{name}: mean"
        assert abs(t.std().item() - std) < 5 * std / math.sqrt(t.numel()), f"{name}: std"


def test_product_chain_ntk_parametrisation():
    torch.manual_seed(10)
    layer = hk.nn.ProductChain(256, 128, degree=4)
    assert layer.mode == "product" and layer.activation == "relu" and layer.bias is None
    assert layer.scale == pytest.approx(math.sqrt(2 / 128))
    w = layer.weight.detach()
    assert w.shape == (4, 128, 256)
    tol = 5 / math.sqrt(w.numel())  # five standard errors
    assert abs(w.mean().item()) < tol and abs(w.std().item() - 1) < tol, "W entries are N(0, 1)"
    with_bias = hk.nn.ProductChain(8, 4, degree=2, bias=True)
    assert torch.equal(with_bias.bias.detach(), torch.zeros(2, 4))
    # Each factor sqrt(2/m) relu(w.x) with |x| = sqrt(d) has E[f^2] = d/m: the chain neither explodes nor vanishes
    # when d = m.
    square = hk.nn.ProductChain(512, 512, degree=3)
    x = torch.randn(256, 512)
    y = square(x)
    assert 0.3 < y.pow(2).mean().item() < 3.0


@pytest.mark.parametrize("backend", cpu_backends(torch.float64))
@pytest.mark.parametrize("layer_cls, kwargs", [
    (hk.nn.PolyChain, dict(mode="ccp", activation="gelu", scale=0.7)),
    (hk.nn.PolyChain, dict(mode="product", activation="sigmoid", bias=False)),
    (hk.nn.ProductChain, dict()),
])
def test_module_matches_functional_call(backend, layer_cls, kwargs):
    torch.manual_seed(6)
    layer = layer_cls(9, 6, 3, **kwargs, backend=backend, dtype=torch.float64)
    x = torch.randn(2, 5, 9, dtype=torch.float64)
    out, dx, grads = forward_backward(layer, x)
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias) if p is not None]
    x_ref = x.clone().requires_grad_()
    bias = params[1] if layer.bias is not None else None
    ref = hk.poly_chain(x_ref, params[0], bias, mode=layer.mode, activation=layer.activation, scale=layer.scale,
                        backend="reference")
    ref.backward(torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(ref))
    assert_close("y", out, ref.detach())
    assert_close("dx", dx, x_ref.grad)
    assert_close("dweight", grads["weight"], params[0].grad)
    if bias is not None:
        assert_close("dbias", grads["bias"], bias.grad)


def test_module_compiles_fullgraph():
    torch.manual_seed(7)
    model = hk.nn.CCP(**SMALL, backend="reference")
    x = images(SMALL)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, dx, grads = forward_backward(compiled, x)
    grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}
    ref_out, ref_dx, ref_grads = forward_backward(model, x)
    assert_close("logits", out, ref_out, tol=DROP_IN_TOL)
    assert_close("dx", dx, ref_dx, tol=DROP_IN_TOL)
    for name, g in ref_grads.items():
        assert_close(f"d{name}", grads[name], g, tol=DROP_IN_TOL)


# ---------------------------------------------------------------- every module runs the custom op
# (module factory taking the backend, input, the custom op its forward must dispatch). New modules join here.
MODULE_OPS = [
    (lambda b: hk.nn.CCP(**SMALL, backend=b), images(SMALL), "poly_chain"),
    (lambda b: hk.nn.NCP(**SMALL, backend=b), images(SMALL), "poly_ncp"),
    (lambda b: hk.nn.PolyChain(9, 6, 3, backend=b), torch.randn(2, 5, 9), "poly_chain"),
    (lambda b: hk.nn.ProductChain(9, 6, 3, backend=b), torch.randn(2, 5, 9), "poly_chain"),
    (lambda b: hk.nn.LinearSelfAttention(8, num_heads=2, backend=b), torch.randn(2, 5, 8), "causal_linear_attention"),
    (lambda b: hk.nn.PolyMlp(8, 16, use_spatial=True, backend=b), torch.randn(2, 3, 4, 8), "poly_gate"),
    (lambda b: hk.nn.PolyBlock(8, expansion_factor=2, backend=b), torch.randn(2, 3, 4, 8), "poly_gate"),
    (lambda b: hk.nn.PolySA(7, backend=b), torch.randn(2, 5, 7), "poly_sa"),
    (lambda b: hk.nn.LRNNLayer(5, 4, 3, activation="mlp", backend=b), torch.randn(2, 3, 5), "lrnn_product"),
    (lambda b: hk.nn.LRNN(2, [6, 5], 3, dbar=4, activation="spder", backend=b), torch.randn(7, 2), "lrnn_product"),
]


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("make, x, op", MODULE_OPS)
def test_module_dispatches_the_custom_op(backend, make, x, op):
    """The module's forward and backward go through hadamard_kernels::<op> and its backward op, and the backend it
    was given is the one whose kernels run (a module that computes in plain PyTorch fails here)."""
    module = make(backend)
    with dispatched_ops() as ops:
        forward_backward_checked(module, [x], backend=backend)
    assert f"hadamard_kernels::{op}" in ops, f"{type(module).__name__} did not dispatch {op}: {ops}"
    assert f"hadamard_kernels::{op}_backward" in ops, f"{type(module).__name__}: no {op}_backward: {ops}"


@pytest.mark.parametrize("make, x, op", MODULE_OPS)
def test_module_exports(make, x, op):
    """torch.export keeps the op as one node (its fake implementation gives the shapes) and the exported program
    computes what the module does."""
    module = make("reference")
    program = torch.export.export(module, (x,))
    assert f"hadamard_kernels.{op}" in str(program.graph), f"{type(module).__name__}: {op} not in the exported graph"
    out, expected = program.module()(x), module(x)
    for got, want in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(expected)):
        assert_close(type(module).__name__, got, want.double(), tol=1e-6)


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("make, x", [
    (lambda b: hk.nn.CCP(**SMALL, backend=b), images(SMALL)),
    (lambda b: hk.nn.NCP(**SMALL, backend=b), images(SMALL)),
    (lambda b: hk.nn.PolyChain(4, 3, 2, backend=b), torch.randn(2, 4)),
])
def test_backend_reaches_the_op(make, x):
    with pytest.raises(ValueError, match="backend must be one of"):
        make("no-such-backend")(x)


@pytest.mark.parametrize("make, argument", [
    (lambda: hk.nn.PolyChain(4, 3, 2, mode="ncp"), "mode"),
    (lambda: hk.nn.PolyChain(4, 3, 2, activation="swish"), "activation"),
    (lambda: hk.nn.PolyChain(4, 3, 0), "degree"),
    (lambda: hk.nn.PolyChain(4, 3, 2, scale=float("nan")), "scale"),
    (lambda: hk.nn.ProductChain(4, 0, 2), "out_features"),
    (lambda: hk.nn.CCP(n_degree=0), "n_degree"),
    (lambda: hk.nn.NCP(hidden_size=2.5), "hidden_size"),
])
def test_bad_arguments_raise_value_error(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_wrong_image_size_raises():
    model = hk.nn.CCP(**SMALL, backend="reference")
    with pytest.raises(RuntimeError):  # the survey's view(-1, d) fails the same way on a non-multiple of d
        model(torch.randn(2, 3, 5, 5))


# ---------------------------------------------------------------- GPU
def assert_gpu_model_close(name, out, survey_out, exact, dtype):
    """Ours in `dtype` against the float64 survey model. In bf16 the error may also reach twice that of the survey
    model run in bf16: both round every activation they store."""
    allowed = REL_TOL[dtype]
    if dtype != torch.float32:
        allowed = max(allowed, 2 * rel_err(survey_out, exact))
    err = rel_err(out, exact)
    assert not torch.isnan(out).any(), f"{name}: NaN"
    assert err < allowed, f"{name}: relative error {err:.3e} >= {allowed:.1e} ({dtype})"


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("family", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_modules_match_survey(backend, family, dtype):
    config = dict(hidden_size=64, image_size=28, channels_in=1, n_degree=4, n_classes=10)
    theirs, ours = make_pair(family, backend, dtype=dtype, device="cuda", **config)
    exact = PAIRS[family][0](**config).to(device="cuda", dtype=torch.float64)
    exact.load_state_dict(theirs.state_dict())
    x = images(config, batch=300, dtype=dtype, device="cuda")
    out, dx, grads = forward_backward(ours, x, grad_dtype=dtype)
    same_out, same_dx, same_grads = forward_backward(theirs, x, grad_dtype=dtype)
    ref_out, ref_dx, ref_grads = forward_backward(exact, x.double(), grad_dtype=dtype)
    assert_gpu_model_close("logits", out, same_out, ref_out, dtype)
    assert_gpu_model_close("dx", dx, same_dx, ref_dx, dtype)
    for pname, g in grads.items():
        assert_gpu_model_close(f"d{pname}", g, same_grads[pname], ref_grads[pname], dtype)


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("family", PAIRS)
def test_gpu_training_matches_reference(backend, family):
    _, reference = make_pair(family, "reference", device="cuda", **SMALL)
    _, fused = make_pair(family, backend, device="cuda", **SMALL)
    data = images(SMALL, batch=64, device="cuda")
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0)).cuda()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (reference, fused)]
    for step in range(5):
        losses = []
        for model, opt in zip((reference, fused), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0]), f"step {step}: {backend} {losses[1]} != {losses[0]}"


@cuda
@requires_cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer_cls, kwargs", [
    (hk.nn.PolyChain, dict(mode="ccp", activation="tanh", scale=0.5)),
    (hk.nn.ProductChain, dict()),
])
def test_gpu_chain_layers(backend, dtype, layer_cls, kwargs):
    torch.manual_seed(8)
    layer = layer_cls(96, 80, 3, **kwargs, backend=backend).to(device="cuda", dtype=dtype)
    exact = layer_cls(96, 80, 3, **kwargs, backend="reference").to(device="cuda", dtype=torch.float64)
    exact.load_state_dict(layer.state_dict())
    x = torch.randn(4, 50, 96, device="cuda").to(dtype)
    out, dx, grads = forward_backward(layer, x, grad_dtype=dtype)
    ref_out, ref_dx, ref_grads = forward_backward(exact, x.double(), grad_dtype=dtype)
    assert_close("y", out, ref_out, dtype)
    assert_close("dx", dx, ref_dx, dtype)
    for pname, g in grads.items():
        assert_close(f"d{pname}", g, ref_grads[pname], dtype)


@pytest.mark.parametrize("cls, layer", [("CCP", "U2"), ("NCP", "S2")])
def test_modules_follow_autocast(cls, layer):
    """Under torch.autocast the fused modules run in the autocast dtype like nn.Linear (fp32 parameters, bf16
    compute) and their gradients reach the fp32 parameters; outside it they run in fp32."""
    torch.manual_seed(0)
    model = getattr(hk.nn, cls)(hidden_size=8, image_size=4, n_degree=3, n_classes=5)
    images = torch.randn(6, 1, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grad = getattr(model, layer).weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    expected = model(images)
    assert expected.dtype == torch.float32
    assert (out.float() - expected).norm() / expected.norm() < 2e-2
