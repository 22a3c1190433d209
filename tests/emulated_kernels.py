"""CUDA kernel sources built for the CPU: tests/emulation/cuda_emulation.h runs a kernel's blocks as fibers and
emulates ldmatrix, mma.sync and wmma, so the kernels' own code is checked against the reference without a GPU."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
import types
from pathlib import Path

import pytest
import torch

EMULATION = Path(__file__).parent / "emulation"
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc := shutil.which("nvcc"):
        roots.append(str(Path(nvcc).resolve().parents[1]))
    return next((Path(r) / "include" for r in filter(None, roots) if (Path(r) / "include" / "cuda_fp16.h").is_file()),
                None)


def build(name: str, module_cpp: str, kernel_sources: list[Path], flags: tuple[str, ...] = ()):
    """tests/emulation/<module_cpp> (which includes the kernels' .cu / .cuh files) compiled by the host compiler as the
    Python module `name`. Cached in the temp dir under a hash of the sources and the command. Skips without a C++
    compiler or the CUDA headers; fails when the kernels no longer build for the emulation."""
    pybind11 = pytest.importorskip("pybind11")
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip("the CPU emulation of the kernels needs a C++ compiler and the CUDA headers")
    command = [cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-Wall", "-Wextra", *flags, "-Wno-unknown-pragmas",
               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{include}",
               f"-I{CSRC / 'include'}", f"-I{CSRC}", str(EMULATION / module_cpp)]
    # Every emulation file (shared headers such as wmma_emulation.h included) is part of the cache key.
    sources = [*EMULATION.iterdir(), *kernel_sources, *(CSRC / "include" / "hadamard_kernels").iterdir()]
    digest = hashlib.sha256("\0".join(command).encode())
    for path in sorted(p for p in sources if p.is_file()):
        digest.update(path.read_bytes())
    out = (Path(tempfile.gettempdir()) / f"{name}_{digest.hexdigest()[:16]}" /
           f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
        result = subprocess.run([*command, "-o", str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"{module_cpp}: the kernels no longer build for the CPU emulation:\n{result.stderr[-6000:]}")
        os.replace(partial, out)
    spec = importlib.util.spec_from_file_location(name, out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_on_cpu(cuda_backend, extension, monkeypatch) -> None:
    """A family's cuda.py launches `extension` (the emulated kernels) on CPU tensors."""
    monkeypatch.setattr(cuda_backend, "require_cuda_extension", lambda: extension)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
