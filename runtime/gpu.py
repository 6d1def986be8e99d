"""Put a DeepseekV3Model on a CUDA device: Marlin weights as packed, driven by the Marlin GEMM kernel.

`place_on_device(model, "cuda")` walks the model once:
- every marlin_int4_v1 weight (2-D, or a stack such as the per-head attn_k_b / attn_v_b) becomes a
  `MarlinLinear` over the pack's qweight / scales bytes, read from the pack's files and copied to the GPU as
  stored (no repacking); it casts its input to `act_dtype` (bf16 by default), runs
  `cuda_ops.marlin_gemm` and returns float32, so the rest of the model keeps its float32 arithmetic;
- every other GPU-side tensor (norms, router, bias, bf16/f32 linears, tensors derived at load) moves as it is;
- routed experts stay on the CPU behind `HostExperts`, which moves their inputs and output across (the eager
  path: prefill); the decode step (runtime/graph.py) reaches the same CPU experts through the doorbell.
The embedding stays on the CPU (DeepseekV3Model.forward looks tokens up there and moves the rows).

A pack converted with --target cpu holds CPU linears, which have no GPU path: refused with the tensor's name.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layouts import ids as L
from ..layouts.manifest import Piece
from . import cuda_ops
from .cpu_ops import CpuLinear
from .model import DeepseekV3Model
from .moe import MoE, Router
from .weights import Pack


class MarlinLinear:
    """`y = x · Wᵀ` for a marlin_int4_v1 weight `W[..., N, K]` held on the GPU as packed."""

    def __init__(
        self, name: str, qweight: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], group_size: int,
        act_dtype: torch.dtype = torch.bfloat16,
    ) -> None:  # fmt: skip
        self.name = name
        self.qweight = qweight
        self.scales = scales
        self.shape = shape
        self.group_size = group_size
        self.act_dtype = act_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = cuda_ops.marlin_gemm(x.to(self.act_dtype), self.qweight, self.scales, self.group_size)
        return y.float()


class HostExperts:
    """A layer's CPU routed experts called with device tensors: inputs to the CPU, the output back."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        out = self.inner(x.float().cpu(), topk_idx.cpu(), topk_w.float().cpu())
        return out.to(x.device)


def _read(pack: Pack, p: Piece) -> np.ndarray:
    with open(pack.folder / p.file, "rb") as f:
        f.seek(p.offset)
        buf = f.read(p.nbytes)
    if len(buf) != p.nbytes:
        raise OSError(f"{pack.folder / p.file}: short read of {p.key or p.part}")
    return np.frombuffer(buf, np.uint8)


def marlin_linear(pack: Pack, name: str, device: torch.device, act_dtype: torch.dtype) -> MarlinLinear:
    """The pack's marlin_int4_v1 tensor `name` on `device`, as stored (layouts/SPEC.md)."""
    t = pack.entry(name)
    shape = tuple(int(d) for d in t.shape)
    *lead, n, k = shape
    group = int(t.params["group_size"])
    gk = k if group == -1 else group
    parts = {p.part: p for p in t.pieces}
    qw = _read(pack, parts["qweight"]).view(np.int32).reshape(*lead, k // 16, 2 * n)
    sc = _read(pack, parts["scales"]).view(np.float16).reshape(*lead, k // gk, n)
    qweight = torch.from_numpy(qw.copy()).to(device)
    scales = torch.from_numpy(sc.copy()).to(device)
    return MarlinLinear(name, qweight, scales, shape, group, act_dtype)


def place_on_device(
    model: DeepseekV3Model, device: torch.device | str = "cuda", act_dtype: torch.dtype = torch.bfloat16
) -> DeepseekV3Model:
    """Move `model` to `device` in place (see the module docstring); returns it."""
    device = torch.device(device)
    if device.type == "cuda":
        cuda_ops.load()  # a clear error now rather than at the first GEMM
    pack = model.pack
    marlin: dict[int, MarlinLinear] = {}
    for name, t in pack.entries.items():
        if name.endswith(".attn_kv_b.weight"):
            continue  # split at load into dense attn_k_b / attn_v_b (weights.py), which move as tensors
        if t.layout == L.MARLIN_INT4 and t.placement != "cpu":
            marlin[id(pack.linear(name))] = marlin_linear(pack, name, device, act_dtype)

    def move(obj: object, skip: tuple[str, ...] = ()) -> None:
        for key, v in list(vars(obj).items()):
            if key in skip:
                continue
            if isinstance(v, torch.Tensor):
                setattr(obj, key, marlin.get(id(v)) or v.to(device))
            elif isinstance(v, CpuLinear):
                raise ValueError(
                    f"{v.name} is a CPU linear ({v.entry.layout}): the GPU path needs a pack converted with "
                    "--target gpu"
                )

    move(model)
    for block in model.blocks:
        move(block, skip=("attn", "ffn"))
        move(block.attn, skip=("model",))
        ffn = block.ffn
        if isinstance(ffn, MoE):
            router: Router = ffn.router
            move(router)
            if ffn.shared is not None:
                move(ffn.shared)
            ffn.experts = HostExperts(ffn.experts)
        else:
            move(ffn)
    model.device = device
    return model
