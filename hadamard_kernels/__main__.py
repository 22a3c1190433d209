"""python -m hadamard_kernels info | check [--device cpu|cuda] | bench [args for benchmarks/run.py]"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path


def info() -> int:
    import torch

    import hadamard_kernels as hk
    from hadamard_kernels import _backend

    print(f"hadamard_kernels {hk.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    err = _backend.triton_import_error()
    if err is None:
        import triton
        print(f"triton {triton.__version__}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    else:
        print(f"triton: {err}")
    ext, why = _backend.cuda_extension()
    print(f"CUDA extension hadamard_kernels._C: {'built (' + ext.__file__ + ')' if ext else why}")
    if ext is not None and hasattr(ext, "cuda_runtime_info"):
        driver, runtime, count, error = ext.cuda_runtime_info()
        driver_text = f"CUDA {_backend._cuda_version(driver)}" if driver > 0 else "none"
        print(f"  CUDA runtime {_backend._cuda_version(runtime)} (linked in)   NVIDIA driver: {driver_text}   "
              f"GPUs: {count if error is None else error}")
        if (problem := _backend.cuda_runtime_problem()) is not None:
            print(f"  the cuda backend cannot run here: {problem}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"GPU: {gpu}   {_backend.ENV_BACKEND}={os.environ.get(_backend.ENV_BACKEND, '(unset: auto)')}")
    hopper = _backend.is_hopper()
    print(f"  cuda poly_chain forward on Hopper (wgmma, opt-in): {_backend.ENV_CUDA_WGMMA}="
          f"{os.environ.get(_backend.ENV_CUDA_WGMMA, '0')}; {'this GPU is sm_90' if hopper else 'needs an sm_90 GPU'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"backends for {device} tensors (float32):")
        for name, reason in hk.available_backends(device).items():
            print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def check(device: str | None) -> int:
    import torch

    if not torch.cuda.is_available():
        # No GPU: check the Triton kernels on the CPU interpreter (must be set before any kernel is defined).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from hadamard_kernels._selfcheck import run_checks

    return 0 if run_checks(device) else 1


def bench(args: list[str]) -> int:
    """benchmarks/run.py with `args`: the suite on a GPU, or on a CPU the pipeline check (tiny shapes, CPU times)."""
    runner = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    if not runner.is_file():
        print("the benchmark suite lives in the source tree (benchmarks/run.py); run this from a checkout",
              file=sys.stderr)
        return 2
    import importlib.util

    sys.path.insert(0, str(runner.parent))  # run.py imports its neighbours (cases.py, ...), as when run as a script
    spec = importlib.util.spec_from_file_location("hadamard_kernels_bench_run", runner)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hadamard_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, what is built, and why a backend is unavailable")
    p_check = sub.add_parser("check", help="run every op on every available backend against the float64 reference")
    p_check.add_argument("--device", choices=["cpu", "cuda"], default=None)
    sub.add_parser("bench", help="run the benchmark suite (benchmarks/run.py; without a GPU: the CPU pipeline check)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "check":
        return check(args.device)
    return bench(rest)


if __name__ == "__main__":
    sys.exit(main())
