"""Polynomial nets extrapolate beyond their training data; ReLU MLPs extrapolate linearly.

After Wu et al., "Extrapolation and Spectral Bias of Neural Nets with Hadamard Product: a Polynomial Net Study"
(NeurIPS 2022). Fig. 1: fit f(x) = x^3 + x^2 - 10x + 5 and cos(2x) on [-3, 3], evaluate on [-6, 6]. Fig. 2 /
Theorem 6: fit x1^2 + x2^2 from points in all directions around the origin or only in the positive quadrant,
evaluate on the circle of radius 3: a ReLU PNN extrapolates the quadratic only in the directions it was trained in.

Models: "PNN" is a product chain with ReLU factors, y_n = relu(W_n x + b_n) * y_{n-1} (hk.nn.PolyChain,
mode="product"), "poly" the same chain without activation (a polynomial of degree N in x), each followed by a
linear read-out; "MLP" is a ReLU MLP with two hidden layers. All trained with Adam on the mean squared error.
"""

from __future__ import annotations

import math

import _common
import torch
from torch import nn

import hadamard_kernels as hk

TRAIN, EVAL = 3.0, 6.0  # 1-D: train on [-TRAIN, TRAIN], evaluate on [-EVAL, EVAL]
TARGETS = {"cubic": lambda x: x**3 + x**2 - 10 * x + 5, "cos2x": lambda x: torch.cos(2 * x)}


class ChainRegressor(nn.Module):
    """A product chain (hk.nn.PolyChain, mode="product") of `degree` factors, then a linear read-out."""

    def __init__(self, d: int, width: int, degree: int, activation: str):
        super().__init__()
        self.chain = hk.nn.PolyChain(d, width, degree, mode="product", activation=activation, bias=True)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(self.chain(x)).squeeze(-1)


def mlp(d: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1),
                         nn.Flatten(0))


def fit(model: nn.Module, x, y, steps: int, lr: float = 1e-2) -> float:
    """Adam with a cosine schedule on the squared error of targets scaled to unit variance; the final loss."""
    scale = y.std()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = ((model(x) - y / scale) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.target_scale = scale
    return loss.item()


@torch.no_grad()
def predict(model, x):
    return model(x) * model.target_scale


def relative_rmse(pred, target) -> float:
    return ((pred - target).pow(2).mean().sqrt() / target.pow(2).mean().sqrt()).item()


@torch.no_grad()
def fused_difference(model: ChainRegressor, x, reference) -> dict[str, float]:
    """{backend: largest |prediction - reference prediction| relative to the largest |prediction|} for the
    fused backends of this device: the trained chain gives the same curve through the fused kernels."""
    out, saved = {}, model.chain.backend
    for backend in _common.fused_backends(x.device):
        model.chain.backend = backend
        out[backend] = ((predict(model, x) - reference).abs().max() / reference.abs().max()).item()
    model.chain.backend = saved
    return out


def figure_1(args, device, width, steps, summary):
    """Fit each 1-D target on [-TRAIN, TRAIN]; errors on TRAIN < |x| <= EVAL."""
    x_train = torch.linspace(-TRAIN, TRAIN, 64, device=device)[:, None]
    x_eval = torch.linspace(-EVAL, EVAL, 481, device=device)[:, None]
    outside = x_eval[:, 0].abs() > TRAIN
    curves = {}
    for target, f in TARGETS.items():
        y_eval = f(x_eval[:, 0])
        models = {"PNN (ReLU product chain, degree 3)": ("pnn", lambda: ChainRegressor(1, width, 3, "relu")),
                  "poly (product chain, no activation, degree 3)":
                      ("poly", lambda: ChainRegressor(1, width, 3, "identity")),
                  "ReLU MLP (2 hidden layers)": ("mlp", lambda: mlp(1, width))}
        if target != "cubic":
            del models["poly (product chain, no activation, degree 3)"]  # a cubic cannot follow cos(2x) anywhere
        for label, (key, build) in models.items():
            torch.manual_seed(args.seed)
            model = build().to(device)
            loss = fit(model, x_train, f(x_train[:, 0]), steps)
            pred = predict(model, x_eval)
            err_in = relative_rmse(pred[~outside], y_eval[~outside])
            err_out = relative_rmse(pred[outside], y_eval[outside])
            summary[f"{target}_{key}_extrap_err"] = err_out
            print(f"fig1 {target:5s} {key:4s}: train loss {loss:.2e}, relative RMS error inside {err_in:.3g}, "
                  f"outside the training interval {err_out:.3g}")
            if key != "mlp":
                for backend, diff in fused_difference(model, x_eval, pred).items():
                    summary[f"{target}_{key}_fused_diff"] = max(summary.get(f"{target}_{key}_fused_diff", 0), diff)
                    print(f"    {backend} forward of the trained chain vs the training backend: max rel diff "
                          f"{diff:.1e}")
            curves[target, label] = pred.cpu()
    return x_eval[:, 0].cpu(), curves


def figure_2(args, device, width, steps, n_train, summary):
    """x1^2 + x2^2 from points in all directions (the disk of radius 1) or in the positive quadrant only;
    errors on the circle of radius 3, per direction."""
    gen = torch.Generator().manual_seed(args.seed)
    radius = torch.rand(n_train, generator=gen).sqrt()
    angle = 2 * math.pi * torch.rand(n_train, generator=gen)
    disk = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    sets = {"all directions": disk.to(device), "positive quadrant": disk.abs().to(device)}
    theta = torch.linspace(0, 2 * math.pi, 361)
    circle = (3.0 * torch.stack([torch.cos(theta), torch.sin(theta)], 1)).to(device)
    target = circle.pow(2).sum(1)
    errors = {}
    for data_name, x in sets.items():
        y = x.pow(2).sum(1)
        for key, build in (("pnn", lambda: ChainRegressor(2, width, 2, "relu")), ("mlp", lambda: mlp(2, width))):
            torch.manual_seed(args.seed)
            model = build().to(device)
            fit(model, x, y, steps)
            pred = predict(model, circle)
            err = relative_rmse(pred, target)
            summary[f"quad_{key}_{data_name.split()[0]}_extrap_err"] = err
            print(f"fig2 {key} trained on {data_name:17s}: relative RMS error on the circle of radius 3 {err:.3g}")
            errors[key, data_name] = ((pred - target).abs() / target).cpu()
    return theta, sets, errors


def main():
    args = _common.parse_args(__doc__)
    device = args.device
    if args.smoke:
        width, steps = 32, 250
    elif args.quick:
        width, steps = 64, 600
    else:
        width, steps = 256, 4000
    trained_with = hk.nn.PolyChain(1, 1, 1).to(device)
    print(f"device {_common.device_label(device)}; width {width}, {steps} Adam steps per model; the chains train on "
          f"backend={trained_with.backend} (auto: the reference on CPU tensors, the fused kernels on a GPU)")
    summary = {}
    x_eval, curves = figure_1(args, device, width, steps, summary)
    theta, sets, errors = figure_2(args, device, width, steps, 256, summary)

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.3))
    axes[3].sharey(axes[2])
    for ax, (target, f) in zip(axes[:2], TARGETS.items()):
        truth = f(x_eval)
        ax.plot(x_eval, truth, "k", lw=2.5, alpha=0.35, label="target")
        for (t, label), pred in curves.items():
            if t == target:
                ax.plot(x_eval, pred, label=label)
        ax.axvspan(-TRAIN, TRAIN, color="0.9", zorder=-1, label="training interval")
        pad = 0.3 * (truth.max() - truth.min())
        ax.set_ylim(truth.min() - pad, truth.max() + pad)
        ax.set_title({"cubic": "x³ + x² − 10x + 5", "cos2x": "cos(2x)"}[target])
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
    for ax, key in zip(axes[2:], ("pnn", "mlp")):
        for data_name in sets:
            ax.plot(torch.rad2deg(theta), errors[key, data_name], label=f"trained on {data_name}")
        ax.axvspan(0, 90, color="0.9", zorder=-1, label="positive quadrant")
        ax.set_title(f"x1² + x2², {'ReLU PNN (degree 2)' if key == 'pnn' else 'ReLU MLP'}: error at radius 3")
        ax.set_xlabel("direction (degrees)")
        ax.set_ylabel("|prediction − target| / target")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    # The training points of figure 2, in the PNN panel's corner.
    inset = axes[2].inset_axes([0.02, 0.66, 0.16, 0.3])
    for data_name, x in sets.items():
        inset.scatter(*x.cpu().T, s=1)
    inset.set_xticks([])
    inset.set_yticks([])
    path = _common.save_figure(fig, args.out, "pnn_extrapolation")
    print(f"saved {path}")
    _common.result("pnn_extrapolation", device=device.type, **summary, png=path)


if __name__ == "__main__":
    main()
