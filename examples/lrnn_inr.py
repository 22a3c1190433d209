"""An implicit neural representation of a photograph: LRNN-SPDER (hk.nn.LRNN) vs a SIREN of the same size.

The image is scikit-learn's sample "china.jpg" (427 x 640 RGB, shipped inside scikit-learn), in grayscale,
downscaled on a CPU. Each network maps pixel coordinates (x, y) in [-1, 1]^2 to the gray level; both are trained
with Adam on mini-batches of pixels from the same seed. The LRNN (Maharaj & Nair, "Deep Learning with Learnable
Product-Structured Activations") has product activations phi_l = prod_j (1 + g(z_lj) / sqrt(dbar)) with
g = SPDER (sin(z) sqrt|z|) and a LayerNorm after each layer; the SIREN (Sitzmann et al.) is an MLP with sin(30 z)
activations and its published initialisation. The example prints the PSNR after every epoch and the time per
training step of the LRNN on the fused backends and on the reference, whose loss curves must coincide.
"""

from __future__ import annotations

import copy
import math

import _common
import numpy as np
import torch
from torch import nn

import hadamard_kernels as hk

SIREN_OMEGA = 30.0  # SIREN's w0: sin(30 z) on coordinates in [-1, 1]
FIRST_SCALE = 10.0  # the LRNN's first layer sees frequencies up to about this (weights U(-s, s) on coordinates)


def load_image(height: int, device: torch.device) -> torch.Tensor:
    """The grayscale china.jpg resized to `height` rows (aspect kept), values in [0, 1], [H, W]."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rgb = load_sample_image("china.jpg")
    image = Image.fromarray(rgb).convert("L")
    if height != image.height:
        image = image.resize((round(image.width * height / image.height), height), Image.Resampling.LANCZOS)
    return (torch.from_numpy(np.asarray(image, dtype=np.float32)) / 255).to(device)


def coordinates(height: int, width: int, device) -> torch.Tensor:
    """[H * W, 2] pixel centres in [-1, 1]^2, row-major like the image."""
    ys = torch.linspace(-1, 1, height, device=device)
    xs = torch.linspace(-1, 1, width, device=device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(-1, 2)


class Sine(nn.Module):
    def forward(self, x):
        return torch.sin(SIREN_OMEGA * x)


def siren(width: int, hidden_layers: int) -> nn.Sequential:
    """SIREN: Linear + sin(30 .) layers, then a linear output. First layer U(-1/2, 1/2) (1 / fan_in), the others
    U(-sqrt(6 / fan_in) / 30, sqrt(6 / fan_in) / 30), as in the SIREN paper."""
    layers = [nn.Linear(2, width), Sine()]
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, width), Sine()]
    layers.append(nn.Linear(width, 1))
    with torch.no_grad():
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        linears[0].weight.uniform_(-1 / 2, 1 / 2)
        for lin in linears[1:]:
            bound = math.sqrt(6 / lin.in_features) / SIREN_OMEGA
            lin.weight.uniform_(-bound, bound)
    return nn.Sequential(*layers)


def lrnn(rank: int, layers: int, dbar: int) -> hk.nn.LRNN:
    model = hk.nn.LRNN(2, [rank] * layers, 1, dbar, activation="spder", layer_norm=True)
    # hk.nn.LRNN initialises every layer for inputs of unit second moment (LRNN's Lemma 1); on raw coordinates the
    # first layer needs higher frequencies to represent an image's detail, as SIREN's w0 gives.
    with torch.no_grad():
        model.layers[0].weight.uniform_(-FIRST_SCALE, FIRST_SCALE)
        model.layers[0].bias.uniform_(-math.pi, math.pi)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def siren_width(target: int, hidden_layers: int) -> int:
    """The SIREN width whose parameter count is closest to `target`."""
    count = lambda w: 3 * w + hidden_layers * (w * w + w) + w + 1  # noqa: E731
    return min(range(1, 4096), key=lambda w: abs(count(w) - target))


def psnr(model, coords, image) -> float:
    with torch.no_grad():
        pred = torch.cat([model(c) for c in coords.split(65536)]).view_as(image)
    mse = (pred.clamp(0, 1) - image).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


def batch_order(n_pixels: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The pixel indices of every step (epochs of shuffled mini-batches), fixed by the seed."""
    gen = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < steps:
        perm = torch.randperm(n_pixels, generator=gen)
        order += list(perm.split(batch))[:n_pixels // batch]
    return order[:steps]


def train(model, coords, target, order, lr, device, image=None, steps_per_epoch=None, label=""):
    """Adam on the mean squared error over the steps' mini-batches. Returns (loss per step, ms per step after the
    first, PSNR after every epoch when `image` is given)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, psnrs, watch = [], [], _common.Stopwatch(device)
    for step, idx in enumerate(order):
        idx = idx.to(device)
        if step:
            watch.start()
        loss = (model(coords[idx]).squeeze(-1) - target[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            watch.stop()
        losses.append(loss.item())
        if image is not None and (step + 1) % steps_per_epoch == 0:
            psnrs.append(psnr(model, coords, image))
            print(f"  {label} epoch {len(psnrs):3d}: PSNR {psnrs[-1]:.2f} dB", flush=True)
    return losses, watch.ms, psnrs


def main():
    args = _common.parse_args(__doc__)
    device = args.device
    # check: the steps (and pixels per step) on which every backend trains from the same weights; on the CPU the
    # fused backend is the Triton interpreter, so a few small steps there, on a GPU the whole run.
    if args.smoke:
        height, rank, layers, dbar, batch, epochs, check = 24, 16, 2, 4, 96, 12, (2, 32)
    elif args.quick:
        height, rank, layers, dbar, batch, epochs, check = 64, 48, 2, 4, 512, 30, (3, 64)
    else:  # full size: 427 x 640 pixels, ~200k parameters
        height, rank, layers, dbar, batch, epochs, check = 427, 128, 3, 6, 16384, 100, None
    lrnn_lr, siren_lr = 3e-3, 1e-3  # each the better of 1e-3 and 3e-3 at the --quick size
    image = load_image(height, device)
    H, W = image.shape
    coords, target = coordinates(H, W, device), image.view(-1)
    steps_per_epoch = (H * W) // batch
    order = batch_order(H * W, batch, epochs * steps_per_epoch, args.seed)
    on_gpu = device.type == "cuda"
    check_order = order if on_gpu else [idx[:check[1]] for idx in order[:check[0]]]

    torch.manual_seed(args.seed)
    lrnn_model = lrnn(rank, layers, dbar).to(device)
    siren_model = siren(siren_width(n_params(lrnn_model), layers), layers).to(device)
    print(f"china.jpg in grayscale, {H} x {W} pixels; {epochs} epochs of {steps_per_epoch} Adam steps of {batch} "
          f"pixels; device {_common.device_label(device)}")
    print(f"LRNN-SPDER: ranks {[rank] * layers}, dbar {dbar}, {n_params(lrnn_model)} parameters; SIREN: "
          f"{layers + 1} sine layers of width {siren_model[0].out_features}, {n_params(siren_model)} parameters")
    if not on_gpu:
        print("note: " + _common.INTERPRETER_NOTE)

    summary, curves = {}, {}
    fused = _common.fused_backends(device)
    main_backend = fused[0] if on_gpu and fused else "reference"
    lrnn_psnr = trained = None

    def lrnn_run(backend, steps, log):
        model = copy.deepcopy(lrnn_model)
        for layer in model.layers:
            layer.backend = backend
        losses, ms, psnrs = train(model, coords, target, steps, lrnn_lr, device, image if log else None,
                                  steps_per_epoch, f"LRNN ({backend})")
        return model, losses, ms, psnrs

    pixels = len(check_order[0])
    for backend in ["reference", *fused]:
        model, curves[backend], ms, psnrs = lrnn_run(backend, check_order, on_gpu and backend == main_backend)
        summary[f"lrnn_ms_{backend}"] = ms
        print(f"LRNN {backend}: {ms:.2f} ms per step of {pixels} pixels ({_common.device_label(device)}, "
              f"{len(check_order)} steps)")
        if on_gpu and backend == main_backend:
            trained, lrnn_psnr = model, psnrs
    for backend in fused:
        diff = max(abs(a - b) / b for a, b in zip(curves[backend], curves["reference"]))
        summary[f"lrnn_maxdiff_{backend}"] = diff
        print(f"LRNN: largest |loss({backend}) - loss(reference)| / loss(reference) over {len(check_order)} steps "
              f"= {diff:.2e}")
    if trained is None:  # on the CPU: the whole run on the reference
        trained, _, _, lrnn_psnr = lrnn_run(main_backend, order, True)

    _, siren_ms, siren_psnr = train(siren_model, coords, target, order, siren_lr, device, image, steps_per_epoch,
                                    "SIREN")
    mean_psnr = 10 * math.log10(1 / image.var(unbiased=False).item())  # the image's mean gray everywhere
    summary.update(lrnn_psnr=lrnn_psnr[-1], siren_psnr=siren_psnr[-1], mean_psnr=mean_psnr, siren_ms=siren_ms,
                   lrnn_params=n_params(lrnn_model), siren_params=n_params(siren_model))
    print(f"final PSNR: LRNN-SPDER {lrnn_psnr[-1]:.2f} dB, SIREN {siren_psnr[-1]:.2f} dB; SIREN {siren_ms:.2f} ms "
          f"per step of {batch} pixels ({_common.device_label(device)})")

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2), gridspec_kw={"width_ratios": [1, 1, 1, 1.1]})
    with torch.no_grad():
        views = {"target": image,
                 f"LRNN-SPDER ({lrnn_psnr[-1]:.1f} dB)": trained(coords).view(H, W).clamp(0, 1),
                 f"SIREN ({siren_psnr[-1]:.1f} dB)": siren_model(coords).view(H, W).clamp(0, 1)}
    for ax, (title, picture) in zip(axes, views.items()):
        ax.imshow(picture.cpu(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    epochs_axis = range(1, epochs + 1)
    axes[3].plot(epochs_axis, lrnn_psnr, label=f"LRNN-SPDER, {n_params(lrnn_model)} parameters")
    axes[3].plot(epochs_axis, siren_psnr, label=f"SIREN, {n_params(siren_model)} parameters")
    axes[3].axhline(mean_psnr, color="0.6", ls="--", label="the mean gray level")
    axes[3].set_xlabel("epoch")
    axes[3].set_ylabel("PSNR (dB)")
    timing = ", ".join(f"{b} {summary[f'lrnn_ms_{b}']:.1f}" for b in ["reference", *fused])
    axes[3].set_title(f"LRNN ms per step of {pixels} pixels on {_common.device_label(device)}: {timing}"
                      + ("\n(CPU: Triton interpreter, not kernel speed)" if device.type == "cpu" else ""), fontsize=9)
    axes[3].legend()
    path = _common.save_figure(fig, args.out, "lrnn_inr")
    print(f"saved {path}")
    _common.result("lrnn_inr", device=device.type, height=H, width=W, **summary, png=path)


if __name__ == "__main__":
    main()
