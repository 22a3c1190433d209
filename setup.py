"""Build driver: CMake (Ninja) -> nvcc -> the pybind11 module `hadamard_kernels._C`.

The CUDA code never links libtorch, so it builds on a machine with a CPU-only torch (or none).
Environment:
  HADAMARD_KERNELS_CUDA        auto (default: build when nvcc is found) | 1 (build or fail) | 0 (pure Python)
  HADAMARD_KERNELS_CUDA_ARCHS  CMake CUDA architectures (default in CMakeLists.txt: "80-real;90a-real;80-virtual")
  HADAMARD_KERNELS_WERROR      1: warnings are errors (CI); default 0
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    candidates += [Path(p) for p in filter(None, [shutil.which("nvcc")])]
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((str(c) for c in candidates if c.is_file()), None)


def cuda_build_requested():
    mode = os.environ.get("HADAMARD_KERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"HADAMARD_KERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc = find_nvcc()
    if mode == "1" and nvcc is None:
        sys.exit("HADAMARD_KERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if mode == "0" or nvcc is None:
        print("hadamard_kernels: building without the CUDA extension "
              f"({'HADAMARD_KERNELS_CUDA=0' if mode == '0' else 'nvcc not found'}); "
              "the reference and Triton backends are installed", file=sys.stderr)
        return None
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        nvcc = os.environ["HADAMARD_KERNELS_NVCC"]
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("HADAMARD_KERNELS_CUDA_ARCHS")
        werror = os.environ.get("HADAMARD_KERNELS_WERROR", "0")
        if werror not in ("0", "1"):
            sys.exit(f"HADAMARD_KERNELS_WERROR must be 0 or 1, got {werror!r}")
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            # Unset: forget what an earlier build cached, so CMakeLists.txt's default applies.
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}" if archs else "-UCMAKE_CUDA_ARCHITECTURES",
            f"-DHK_WERROR={'ON' if werror == '1' else 'OFF'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


nvcc = cuda_build_requested()
ext_modules, cmdclass = [], {}
if nvcc is not None:
    os.environ["HADAMARD_KERNELS_NVCC"] = nvcc
    ext_modules, cmdclass = [CMakeExtension("hadamard_kernels._C")], {"build_ext": CMakeBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
