"""What every example shares: its command line, where Triton runs, timing, the figure and the RESULT line."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

INTERPRETER_NOTE = ("CPU timings: the fused backend runs on the Triton interpreter there (numpy, one program at a "
                    "time), so its time says nothing about kernel speed; run with --device cuda for that")


def parse_args(description: str, smoke_help: bool = False) -> argparse.Namespace:
    """--device, --quick, --out, --seed; --smoke (hidden): the smallest size, for the test suite."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a minute or so on a CPU")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for the PNG (default examples/results)")
    parser.add_argument("--seed", type=int, default=0)
    # Smaller still than --quick: what tests/test_examples.py runs in CI. Same code, smaller sizes.
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.quick = args.quick or args.smoke
    args.device = setup_device(args.device)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def setup_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    if device.type == "cpu":
        # The fused (Triton) backend runs on CPU tensors through the interpreter. hadamard_kernels imports its
        # Triton modules at the first call of an op, so setting this before any op runs is early enough.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The CPU sizes are tiny: a second intra-op thread costs more in hand-offs than it gives (several times
        # more on a busy 2-core machine).
        torch.set_num_threads(1)
    return device


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time of code between start() and stop(), with the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.total, self.count = device, 0.0, 0

    def start(self) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        sync(self.device)
        self.total += time.perf_counter() - self._t0
        self.count += 1

    @property
    def ms(self) -> float:
        return 1e3 * self.total / max(self.count, 1)


def pyplot():
    """matplotlib.pyplot on a file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def result(example: str, **values) -> None:
    """The last line an example prints: `RESULT example=NAME key=value ...` (floats in %.6g, no spaces)."""
    parts = [f"example={example}"]
    for key, value in values.items():
        parts.append(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}")
    print("RESULT " + " ".join(parts), flush=True)


def fused_backends(device: torch.device) -> list[str]:
    """The fused backends that can run float32 tensors on `device` here (triton on the CPU interpreter, triton and
    cuda on a GPU when built)."""
    import hadamard_kernels as hk

    return [name for name, why in hk.available_backends(device, torch.float32).items()
            if name != "reference" and why is None]
