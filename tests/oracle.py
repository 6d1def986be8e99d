"""The transformers oracle for the runtime tests, shared by several test modules.

- `hf_model(tiny_dir)`: transformers' `DeepseekV3ForCausalLM` (float32, eager) on the original hf/
  weights; `hf_model(tiny_dir, hf_state_from_pack(folder))`: the same architecture holding exactly
  the values a packed folder represents (lossy layouts: the oracle runs on the pack's weights).
- `Packs`: packed folders of the tiny family, converted once per (source, options) for the whole
  session; `oracle_for(tiny_dir, folder)`: the transformers model of a pack, built once per folder.
- `compare`: the runtime's bound against the oracle (1e-4 on logits, top-1 equal everywhere).
- `kt_run_cmd()`: how to start kt-run as a separate process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ktpack.convert.gguf_source import open_gguf
from ktpack.convert.names import GGUF_TO_HF, GLOBAL_GGUF_TO_HF
from ktpack.convert.plan import ConvertOptions, make_plan
from ktpack.convert.writer import write
from ktpack.layouts import manifest as mf
from ktpack.layouts.tensor_io import tensor_values

TOL = 1e-4


def hf_model(tiny_dir: Path, state: dict[str, torch.Tensor] | None = None):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    if state is None:
        return DeepseekV3ForCausalLM.from_pretrained(
            tiny_dir / "hf", dtype=torch.float32, attn_implementation="eager"
        ).eval()
    cfg = DeepseekV3Config.from_pretrained(tiny_dir / "hf")
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def compare(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> float:
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol}"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), "top-1 differs"
    return diff


# --------------------------------------------------------------- GGUF names -> transformers names

_GLOBAL = GLOBAL_GGUF_TO_HF
_BLOCK = {**GGUF_TO_HF, "ffn_down_exps.weight": "mlp.experts.down_proj"}


def hf_state_from_pack(folder: Path) -> dict[str, torch.Tensor]:
    """A transformers state dict holding exactly the values the pack represents."""
    m = mf.load(folder)
    vals = {t.name: tensor_values(folder, t) for t in m.tensors}
    state: dict[str, torch.Tensor] = {}
    for name, v in vals.items():
        if name in _GLOBAL:
            state[_GLOBAL[name]] = torch.from_numpy(v)
            continue
        _, i, rest = name.split(".", 2)
        p = f"model.layers.{i}."
        if rest in _BLOCK:
            state[p + _BLOCK[rest]] = torch.from_numpy(v)
        elif rest == "ffn_gate_exps.weight":  # transformers fuses gate and up: [E, 2I, H]
            up = vals[f"blk.{i}.ffn_up_exps.weight"]
            state[p + "mlp.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([v, up], axis=1))
        elif rest == "attn_k_b.weight":  # kv_b per head = [k_b[h]ᵀ ; v_b[h]]
            vb = vals[f"blk.{i}.attn_v_b.weight"]
            kv = np.concatenate([v.transpose(0, 2, 1), vb], axis=1)
            state[p + "self_attn.kv_b_proj.weight"] = torch.from_numpy(kv.reshape(-1, kv.shape[-1]))
        elif rest not in ("ffn_up_exps.weight", "attn_v_b.weight"):
            raise AssertionError(f"unmapped tensor {name}")
    return state


# --------------------------------------------------------------- session-wide caches

_models: dict[str, object] = {}


def oracle_for(tiny_dir: Path, folder: Path | None = None):
    """transformers on the original hf/ weights (folder None) or on a pack's weights; built once."""
    key = "hf" if folder is None else str(folder)
    if key not in _models:
        _models[key] = hf_model(tiny_dir) if folder is None else hf_model(tiny_dir, hf_state_from_pack(folder))
    return _models[key]


class Packs:
    """`packs(src, **opts)`: the tiny source `src` converted with `ConvertOptions(**opts)`, once."""

    def __init__(self, tiny_dir: Path, root: Path) -> None:
        self.tiny_dir, self.root = tiny_dir, root
        self._done: dict[tuple, Path] = {}

    def __call__(self, src: str, **opts) -> Path:
        key = (src, tuple(sorted(opts.items())))
        if key not in self._done:
            out = self.root / f"p{len(self._done)}"
            write(make_plan(open_gguf(self.tiny_dir / src), ConvertOptions(**opts)), out, progress=False)
            self._done[key] = out
        return self._done[key]


_packs: dict[Path, Packs] = {}


def session_packs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Packs:
    """One `Packs` per tiny family for the whole session (shared by every module that asks)."""
    if tiny_dir not in _packs:
        _packs[tiny_dir] = Packs(tiny_dir, tmp_path_factory.mktemp("packs"))
    return _packs[tiny_dir]


def kt_run_cmd() -> list[str]:
    """The `kt-run` console script of this environment (or the module, if it is not installed)."""
    exe = Path(sys.executable).with_name("kt-run")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ktpack.runtime.cli"]
