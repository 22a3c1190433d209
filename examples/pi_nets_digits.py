"""Π-nets (CCP, NCP) on scikit-learn's 8x8 digits: the fused backends train the same model as the reference.

Each model is trained once per backend from the same initial weights on the same mini-batches, so the loss curves
must coincide (up to float32 rounding); the example prints their largest difference, the test accuracy and the
time per training step. Data: sklearn.datasets.load_digits (1797 images, shipped inside scikit-learn).
"""

from __future__ import annotations

import copy

import _common
import torch
import torch.nn.functional as F

import hadamard_kernels as hk

MODELS = {"CCP": hk.nn.CCP, "NCP": hk.nn.NCP}


def load_digits(seed: int, device: torch.device):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    train, test = perm[:n_train], perm[n_train:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def batches(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The mini-batch indices of every step, fixed by the seed, so every backend sees the same batches."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def train(model, backend, x, y, order, lr, device):
    """Adam on cross-entropy; returns (loss per step, ms per step). The first step (Triton compiles its kernels
    there) is not timed."""
    model.backend = backend
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, watch = [], _common.Stopwatch(device)
    for step, idx in enumerate(order):
        if step:
            watch.start()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            watch.stop()
        losses.append(loss.item())
    return losses, watch.ms


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def main():
    args = _common.parse_args(__doc__)
    device = args.device
    if args.smoke:
        steps, batch, hidden, degree = 12, 32, 16, 3
    elif args.quick:
        steps, batch, hidden, degree = 60, 32, 16, 4
    else:
        steps, batch, hidden, degree = 1500, 64, 32, 4
    lr = 1e-2
    x_train, y_train, x_test, y_test = load_digits(args.seed, device)
    order = [idx.to(device) for idx in batches(len(x_train), batch, steps, args.seed)]
    backends = ["reference", *_common.fused_backends(device)]
    print(f"digits: {len(x_train)} train / {len(x_test)} test images of 8x8; {steps} Adam steps of {batch} images; "
          f"hidden {hidden}, degree {degree}; device {_common.device_label(device)}; backends {backends}")
    if device.type == "cpu":
        print("note: " + _common.INTERPRETER_NOTE)

    curves, summary = {}, {}
    for name, cls in MODELS.items():
        torch.manual_seed(args.seed)
        initial = cls(hidden_size=hidden, image_size=8, n_degree=degree, n_classes=10).to(device)
        for backend in backends:
            model = copy.deepcopy(initial)  # the same initial weights for every backend
            losses, ms = train(model, backend, x_train, y_train, order, lr, device)
            acc = accuracy(model, x_test, y_test)
            curves[name, backend] = losses
            summary[f"{name.lower()}_acc_{backend}"] = acc
            summary[f"{name.lower()}_ms_{backend}"] = ms
            print(f"{name} {backend:9s}: final train loss {losses[-1]:.4f}, test accuracy {acc:.3f}, "
                  f"{ms:.2f} ms/step ({_common.device_label(device)})")
        for backend in backends[1:]:
            diff = max(abs(a - b) for a, b in zip(curves[name, backend], curves[name, "reference"]))
            summary[f"{name.lower()}_maxdiff_{backend}"] = diff
            print(f"{name}: largest |loss({backend}) - loss(reference)| over {steps} steps = {diff:.2e}")

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5.5 * len(MODELS), 4))
    for ax, name in zip(axes, MODELS):
        for backend, style in zip(backends, ("-", "--", ":")):
            acc = summary[f"{name.lower()}_acc_{backend}"]
            ax.plot(curves[name, backend], style, label=f"{backend} (test acc {acc:.3f})")
        ax.set_yscale("log")
        ax.set_title(f"Π-net {name} on digits (degree {degree}, hidden {hidden})")
        ax.set_xlabel("Adam step")
        ax.set_ylabel("training cross-entropy")
        ax.legend()
    timing = ", ".join(f"{b} {summary[f'ccp_ms_{b}']:.2f}" for b in backends)
    fig.suptitle(f"CCP ms/step on {_common.device_label(device)}: {timing}"
                 + (" (CPU: Triton interpreter, not kernel speed)" if device.type == "cpu" else ""), fontsize=9)
    path = _common.save_figure(fig, args.out, "pi_nets_digits")
    print(f"saved {path}")
    _common.result("pi_nets_digits", device=device.type, steps=steps, **summary, png=path)


if __name__ == "__main__":
    main()
