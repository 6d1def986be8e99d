"""The CUDA kernels of kernels/cuda/ for the runtime, compiled on first use where a CUDA torch and nvcc exist.

- `marlin_gemm(x, qweight, scales, group_size)`: y = x · Wᵀ over the marlin_int4_v1 tensors as packed
  (fp16/bf16 activations, fp32 accumulation; see marlin_gemm.h).
- `doorbell_start(flags, layer)` / `doorbell_wait(flags)`: the GPU side of the CPU-expert hand-off, two host
  nodes with the shared expert's kernels between them (doorbell.h; runtime/doorbell.py).

`load()` builds binding.cpp + marlin_gemm.cu + doorbell.cu with `torch.utils.cpp_extension.load` (ninja and
nvcc; about a minute the first time, then cached under the torch extensions folder, or KTPACK_CUDA_BUILD) and
prints one line while it does. Where the machine cannot (no CUDA device, a CPU-only torch, no nvcc or ninja)
it raises `CudaUnavailable` with the reason. Importing this module never needs any of them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "kernels" / "cuda"  # the sources
SOURCES = ("binding.cpp", "marlin_gemm.cu", "doorbell.cu")
EXT_NAME = "ktpack_cuda"
KERNELS = {"auto": 0, "simt": 1, "mma": 2}  # CUDA cores (small M), tensor cores (mma.m16n8k16)

_loaded = False


class CudaUnavailable(RuntimeError):
    """The CUDA kernels cannot be built or run on this machine (the message says why)."""


def nvcc_path() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else the PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def why_unavailable() -> str | None:
    """None when `load()` can build and run the kernels here, else the reason (one line)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if nvcc_path() is None:
        return "nvcc was not found (set CUDA_HOME or put the CUDA toolkit's bin/ on PATH)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary next to the interpreter)
        except ImportError:
            return "ninja is not installed (pip install ninja): torch.utils.cpp_extension needs it"
    return None


def available() -> bool:
    return why_unavailable() is None


def load() -> None:
    """Build (first time) and load the extension; its ops then live in torch.ops.ktpack_cuda."""
    global _loaded
    if _loaded:
        return
    why = why_unavailable()
    if why:
        raise CudaUnavailable(f"ktpack CUDA kernels unavailable: {why}")
    import torch
    from torch.utils import cpp_extension

    build = os.environ.get("KTPACK_CUDA_BUILD")
    if build:
        Path(build).mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    where = build or "the torch extensions cache"
    print(
        f"ktpack: building the CUDA kernels for sm_{major}{minor} in {where} (first use; cached after)",
        file=sys.stderr,
        flush=True,
    )
    cpp_extension.load(
        name=EXT_NAME,
        sources=[str(HERE / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        extra_include_paths=[str(HERE)],
        build_directory=build,
        is_python_module=False,
        verbose=False,
    )
    _loaded = True


def marlin_gemm(x, qweight, scales, group_size: int = 128, kernel: str = "auto"):
    """`x[..., K] · Wᵀ -> [..., N]` (a stack: `x[T, B, K] -> [T, B, N]`) in x's dtype (fp16 or bf16).

    qweight int32 `[(B,) K/16, 2N]` and scales fp16 `[(B,) K/g, N]` are the pack's tensors on the GPU, as
    stored; group_size -1 means one group over all of K. kernel: auto, simt (CUDA cores) or mma (tensor cores).
    """
    import torch

    load()
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    check_marlin_args(x, qweight, scales, group_size)
    return torch.ops.ktpack_cuda.marlin_gemm(x, qweight, scales, int(group_size), KERNELS[kernel])


def check_marlin_args(x, qweight, scales, group_size: int) -> None:
    """ValueError naming what is wrong with `marlin_gemm`'s arguments (dtypes and shapes; binding.cpp checks
    the same again). Checked here because on an H200 with torch 2.11 most of binding.cpp's failed checks
    crashed the process (SIGSEGV) instead of raising; the cause is not known yet (kernels/cuda/README.md)."""
    import torch

    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"marlin_gemm: x must be float16 or bfloat16, got {x.dtype}")
    if qweight.dtype != torch.int32 or scales.dtype != torch.float16:
        raise ValueError(f"marlin_gemm: qweight must be int32 and scales float16, got {qweight.dtype}, {scales.dtype}")
    if qweight.dim() not in (2, 3) or scales.dim() != qweight.dim():
        raise ValueError("marlin_gemm: qweight must be [K/16, 2N] or [B, K/16, 2N] and scales have its dims")
    if not (qweight.is_contiguous() and scales.is_contiguous()):
        raise ValueError("marlin_gemm: qweight and scales must be contiguous")
    n, k = qweight.shape[-1] // 2, qweight.shape[-2] * 16
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"marlin_gemm: x has {x.shape[-1] if x.dim() else 0} inputs but qweight holds K = {k}")
    group = k if group_size == -1 else group_size
    if group <= 0 or k % group:
        raise ValueError(f"marlin_gemm: group_size {group_size} does not divide K = {k}")
    if tuple(scales.shape[-2:]) != (k // group, n):
        raise ValueError(
            f"marlin_gemm: scales must be [{k // group}, {n}] for K = {k}, N = {n} and group {group}, "
            f"got {list(scales.shape[-2:])}"
        )
    if qweight.dim() == 3:
        count = qweight.shape[0]
        if scales.shape[0] != count:
            raise ValueError("marlin_gemm: qweight and scales hold different matrix counts")
        if x.dim() != 3 or x.shape[1] != count:
            raise ValueError(f"marlin_gemm: a stack of {count} matrices needs x [T, {count}, K], got {list(x.shape)}")


def doorbell_start(flags, layer: int) -> None:
    """Enqueue the start node of `layer`'s expert hand-off on the current CUDA stream (flags: pinned
    int64[8], runtime/doorbell.py): it publishes the request and returns."""
    import torch

    load()
    torch.ops.ktpack_cuda.doorbell_start(flags, int(layer))


def doorbell_wait(flags) -> None:
    """Enqueue the wait node on the current CUDA stream: the work after it runs once the CPU experts are done."""
    import torch

    load()
    torch.ops.ktpack_cuda.doorbell_wait(flags)
