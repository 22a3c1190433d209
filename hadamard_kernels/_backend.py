"""Backend availability and selection: the one place that decides which implementation runs.

Backends: "reference" (plain PyTorch, any device and dtype), "triton" (CUDA GPUs, or CPU tensors under
TRITON_INTERPRET=1) and "cuda" (the nvcc-built extension `hadamard_kernels._C`, CUDA GPUs).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_BACKEND = "HADAMARD_KERNELS_BACKEND"
# "1": the cuda backend's poly_chain forward runs its Hopper kernel (wgmma, sm_90a) for float16/bfloat16 on sm_90
# GPUs. Opt-in until its GPU tests have passed on an H100 (docs/decisions.md).
ENV_CUDA_WGMMA = "HADAMARD_KERNELS_CUDA_WGMMA"

# Auto's choice per op for CUDA tensors, first available (and supporting the call) wins; then reference.
# DESIGN.md's rule: a backend joins or moves to the front only once its GPU tests passed and it measured fastest on
# a GPU, both recorded in benchmarks/results/; until then auto uses triton. The cuda kernels are not in the table
# yet: their GPU run is not recorded there (ask for them with backend="cuda"). A GPU run's report has the order its
# measurements suggest ("Auto's table, as measured", benchmarks/report.py auto_table).
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "poly_chain": ("triton",),
    "poly_ncp": ("triton",),
    "poly_sa_pool": ("triton",),
    "poly_sa": ("triton",),
    "poly_gate": ("triton",),
    "causal_linear_attention": ("triton",),
    "lrnn_product": ("triton",),
}
DEFAULT_PREFERENCE = ("triton",)

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_hopper(device: torch.device | str | None = None) -> bool:
    """Whether `device` (default: the current CUDA device) is an sm_90 GPU (H100, H200): the wgmma kernels' target."""
    device = torch.device("cuda" if device is None else device)
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) == (9, 0))


def cuda_wgmma_requested() -> bool:
    """Whether ENV_CUDA_WGMMA asks for the Hopper (wgmma) kernels of the cuda backend ("1"; "0" or unset: no)."""
    value = os.environ.get(ENV_CUDA_WGMMA, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_CUDA_WGMMA} must be 0 or 1, got {value!r}")
    return value == "1"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return describe_triton_import_error(exc)
    return None


def describe_triton_import_error(exc: Exception) -> str:
    """Why triton is unusable and the fix, from the exception `import triton` raised."""
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] == "numpy":
        # triton imports but its interpreter (TRITON_INTERPRET=1, how CPUs run the kernels) needs numpy.
        return ("the Triton interpreter needs numpy (pip install numpy)" if triton_interpreting()
                else "triton needs numpy (pip install numpy)")
    return f"triton failed to import ({type(exc).__name__}: {exc}); pip install triton"


@functools.cache
def cuda_extension():
    """Return (module, None) or (None, why it is unavailable)."""
    try:
        return importlib.import_module("hadamard_kernels._C"), None
    except ImportError as exc:
        return None, (f"the extension hadamard_kernels._C is not built ({exc}); reinstall with nvcc on PATH: "
                      "HADAMARD_KERNELS_CUDA=1 pip install --no-build-isolation -e .")


def driver_problem(driver_version: int, runtime_version: int) -> str | None:
    """Why an NVIDIA driver of `driver_version` cannot run the CUDA runtime of `runtime_version` that
    hadamard_kernels._C links statically, or None. Versions as CUDA encodes them (1000 * major + 10 * minor,
    13000 = 13.0); a driver version of 0 means no driver. A driver of the runtime's major version runs any of its
    minor versions (CUDA's minor version compatibility); an older major version fails every launch."""
    if driver_version <= 0:
        return "no NVIDIA driver was found"
    if driver_version // 1000 < runtime_version // 1000:
        return (f"the NVIDIA driver supports CUDA {_cuda_version(driver_version)} but hadamard_kernels._C was built "
                f"with CUDA {_cuda_version(runtime_version)}, whose runtime it links statically: install a driver "
                f"for CUDA {runtime_version // 1000}.x or newer, or rebuild the extension with a CUDA "
                f"{driver_version // 1000}.x toolkit")
    return None


@functools.cache
def cuda_runtime_problem() -> str | None:
    """Why the extension's kernels cannot launch on this machine, or None. Asked once, and only for CUDA tensors
    (so a CPU-only process never initialises the CUDA runtime); never raises."""
    ext, why = cuda_extension()
    if ext is None:
        return why
    if not hasattr(ext, "cuda_runtime_info"):
        return ("hadamard_kernels._C was built from an older version of the package; rebuild it: "
                "HADAMARD_KERNELS_CUDA=1 pip install --no-build-isolation -e .")
    driver, runtime, _, error = ext.cuda_runtime_info()
    if (problem := driver_problem(driver, runtime)) is not None:
        return problem
    if error is not None:
        return f"the CUDA runtime of hadamard_kernels._C finds no usable GPU ({error})"
    return None


def require_cuda_extension():
    """The built extension module, or RuntimeError saying why there is none."""
    ext, why = cuda_extension()
    if ext is None:
        raise RuntimeError(why)
    return ext


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `backend` can run tensors of this device and dtype, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        if (err := triton_import_error()) is not None:
            return err
        if device.type == "cuda":
            if dtype not in GPU_DTYPES:
                return f"the triton backend supports {_names(GPU_DTYPES)} on GPU, got {dtype}"
            return None
        if device.type == "cpu" and triton_interpreting():
            if dtype == torch.bfloat16:
                # The interpreter multiplies raw bf16 bit patterns in tl.dot (triton issue #11584): wrong answers.
                return "bfloat16 tl.dot is wrong under the Triton interpreter; run bfloat16 on a GPU"
            return None
        return (f"the triton backend needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 before importing hadamard_kernels to run it on the CPU interpreter")
    if backend == "cuda":
        ext, err = cuda_extension()
        if ext is None:
            return err
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got {device.type})"
        if dtype not in GPU_DTYPES:
            return f"the cuda backend supports {_names(GPU_DTYPES)}, got {dtype}"
        return cuda_runtime_problem()
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype,
            supports: Callable[[str], bool] = lambda name: True) -> str:
    """The backend that runs `op`: the argument, else $HADAMARD_KERNELS_BACKEND, else auto. Never falls back.

    `supports(name)` tells auto whether a backend handles this call's sizes and options (a kernel's size limit,
    say); a backend that was asked for by name is returned as is and raises on its own."""
    requested, source = backend, "backend"
    if requested is None and os.environ.get(ENV_BACKEND):
        requested, source = os.environ[ENV_BACKEND], ENV_BACKEND
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source} must be one of {BACKENDS} or None, got {requested!r}")
        if (why := unavailable_reason(requested, device, dtype)) is not None:
            raise RuntimeError(f"{op}: backend {requested!r} (from {source}) is not available: {why}")
        return requested
    if device.type == "cuda":
        reasons = []
        for name in AUTO_PREFERENCE.get(op, DEFAULT_PREFERENCE):
            if (why := unavailable_reason(name, device, dtype)) is None:
                if supports(name):
                    return name
                why = "its kernel does not support this call's sizes or options"
            reasons.append(f"{name}: {why}")
        warn_once(f"auto-reference:{op}", f"{op}: no fused kernel runs this call on {dtype} CUDA tensors "
                  f"({'; '.join(reasons)}), so auto runs the reference backend (plain PyTorch, not fused). Pass "
                  "backend='reference' to choose it and silence this warning, which is shown once per op.")
    return "reference"


_WARNED: set[str] = set()  # the keys warn_once has warned about in this process


def warn_once(key: str, message: str) -> None:
    """warnings.warn(message) the first time `key` comes in this process: a warning per op, not per call."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, stacklevel=3)


def available_backends(device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
    """{backend: None if it can run on `device` (default: cuda if present, else cpu), else why not}."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: unavailable_reason(name, device, dtype) for name in BACKENDS}


def _cuda_version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)
