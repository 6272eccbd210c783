"""Build script for the optional compiled kernels in csrc/ (DESIGN.md §2).

fastpo._C_cpu   C++/OpenMP, always attempted.
fastpo._C_cuda  CUDA (sm_80, sm_90 + PTX), built when nvcc is found. FASTPO_BUILD_CUDA=0
                skips it; FASTPO_BUILD_CUDA=1 requires it (a compile error fails the build:
                CI compile-checks the CUDA sources that way). FASTPO_CUDA_ARCHS="80;90".
Both bind raw pointers with pybind11, no torch headers. A failed optional build
leaves a working pure-Python install (the torch / triton backends) and says so.
"""
import os
import platform
import runpy
import shutil
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

BUILD_CUDA = os.environ.get("FASTPO_BUILD_CUDA", "")  # "", "0" or "1"
CUDA_ARCHS = os.environ.get("FASTPO_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]
# Portable baseline; AVX2 / AVX-512 variants are chosen at run time (csrc/cpu/row_kernels.cpp).
ARCH_FLAGS = ["-march=x86-64-v2"] if platform.machine().lower() in ("x86_64", "amd64") else []


_NVCC = runpy.run_path(str(Path(__file__).parent / "csrc" / "nvcc_flags.py"))  # shared with fastpo/aot/cuda_report.py


def _sources(folder: str, *suffixes: str) -> list[str]:
    return sorted(str(p) for p in Path("csrc", folder).iterdir() if p.suffix in suffixes)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _cuda_home(nvcc: str) -> Path:
    for home in (os.environ.get("CUDA_HOME"), Path(nvcc).resolve().parent.parent, "/usr/local/cuda"):
        if home and Path(home, "include", "cuda_runtime.h").exists():
            return Path(home)
    return Path(nvcc).resolve().parent.parent


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc, the rest with the C++ compiler; optional
    extensions that fail become a warning instead of a failed install."""

    def build_extension(self, ext):
        try:
            cu = [s for s in ext.sources if s.endswith(".cu")]
            if cu:
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.extra_objects += [self._nvcc_compile(src) for src in cu]
            super().build_extension(ext)
        except (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError) as err:
            if not ext.optional:
                raise
            backend = "cuda" if ext.name.endswith("cuda") else "cpu"
            self.warn(
                f"fastpo: the optional extension {ext.name} failed to build ({err}); fastpo still works, "
                f"without that backend (backend='{backend}' will be unavailable)."
            )

    def _nvcc_compile(self, src: str) -> str:
        obj = str(Path(self.build_temp, "cuda", Path(src).stem + ".o"))
        Path(obj).parent.mkdir(parents=True, exist_ok=True)
        self.spawn([_nvcc(), "-c", src, "-o", obj, *_NVCC["NVCC_FLAGS"], *_NVCC["HOST_FLAGS"],
                    *_NVCC["gencode"](CUDA_ARCHS)])
        return obj


def _extensions() -> list[Extension]:
    exts = [
        Extension(
            "fastpo._C_cpu",
            sources=_sources("cpu", ".cpp"),
            include_dirs=[pybind11.get_include()],
            # -Wno-psabi: the 64-byte SIMD packs only cross always-inline functions, never an ABI boundary
            extra_compile_args=CXX_FLAGS + ARCH_FLAGS + ["-fopenmp", "-Wno-psabi"],
            extra_link_args=["-fopenmp"],
            language="c++",
            optional=True,
        )
    ]
    nvcc = _nvcc()
    if BUILD_CUDA == "1" and nvcc is None:
        raise RuntimeError("FASTPO_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    if BUILD_CUDA != "0" and nvcc is not None:
        cuda_home = _cuda_home(nvcc)
        exts.append(
            Extension(
                "fastpo._C_cuda",
                sources=_sources("cuda", ".cu", ".cpp"),
                include_dirs=[pybind11.get_include()],
                library_dirs=[str(cuda_home / "lib64"), str(cuda_home / "lib")],
                libraries=["cudart_static", "rt", "pthread", "dl"],  # static runtime: needs only the driver
                extra_compile_args=CXX_FLAGS,
                language="c++",
                optional=BUILD_CUDA != "1",
            )
        )
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
