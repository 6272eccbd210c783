"""The nvcc flags of fastpo._C_cuda, in one place: setup.py builds with them and
fastpo/aot/cuda_report.py compiles the same kernels with them (plain Python, no imports)."""

NVCC_FLAGS = ["-O3", "-std=c++17"]
HOST_FLAGS = ["-Xcompiler", "-fPIC,-fvisibility=hidden"]


def gencode(archs):
    """SASS for each arch in ``archs`` (e.g. ["80", "90"]) plus PTX of the last one for newer GPUs."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags
