"""`kt-convert SRC -o OUT`: pack a DeepSeek-V3/R1 GGUF or safetensors checkpoint into a ktpack folder."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ktpack.layouts import ids as L

from .plan import GIB, ConvertOptions, Plan, PlanError, make_plan
from .source import Source, SourceError
from .writer import ConvertError, write

_DEFAULTS = ConvertOptions()


def open_source(src: Path, plan_only: bool = False) -> Source:
    """Pick the reader by what the path is (never by its name beyond the extension): a folder or a
    .safetensors file is a Hugging Face checkpoint, anything else a GGUF. A header-only source (a
    tensor table without data: GGUF or safetensors shards) is accepted for --plan only."""
    if src.is_dir() or src.suffix == ".safetensors":
        from .safetensors_source import open_safetensors

        return open_safetensors(src, header_only_ok=plan_only)
    from .gguf_source import open_gguf

    return open_gguf(src, header_only_ok=plan_only)


# Defaults that depend on the source: a GGUF keeps its blocks (lossless); a safetensors checkpoint
# (BF16 or FP8) has no ggml blocks, so its experts are quantized to amx-int4 with groups of
# SAFETENSORS_GROUP_SIZE (chosen by measured error: tests/test_safetensors.py, layouts/SPEC.md §8).
SAFETENSORS_CPU_LAYOUT = "amx-int4"
SAFETENSORS_GROUP_SIZE = 64


def default_cpu_layout(source: Source) -> str:
    return "ggml" if source.kind == "gguf" else SAFETENSORS_CPU_LAYOUT


def default_group_size(source: Source) -> int:
    return _DEFAULTS.group_size if source.kind == "gguf" else SAFETENSORS_GROUP_SIZE


def format_plan(plan: Plan) -> str:
    m = plan.manifest
    lines = []
    w = max(len(t.name) for t in m.tensors)
    sw = max(6, *(len(t.source_dtype) for t in m.tensors))  # F8_E4M3 is 7 wide
    lines.append(f"{'tensor':<{w}}  {'source':<{sw}} {'place':<6} {'layout':<15} {'bytes':>14}  nodes")
    for t in m.tensors:
        nodes = ",".join(str(p.node) for p in t.pieces if p.node is not None and p.nbytes) or "-"
        lines.append(
            f"{t.name:<{w}}  {t.source_dtype:<{sw}} {t.placement:<6} {t.layout:<15} {t.nbytes():>14,}  {nodes}"
        )
    lines.append("")
    totals = plan.totals()
    lines.append(f"{'part':<8} {'bytes':>18} {'GiB':>10}")
    for key in sorted(totals, key=lambda k: (k != "gpu", k)):
        lines.append(f"{key:<8} {totals[key]:>18,} {totals[key] / GIB:>10.3f}")
    cpu = sum(v for k, v in totals.items() if k != "gpu")
    lines.append(f"{'cpu':<8} {cpu:>18,} {cpu / GIB:>10.3f}")
    for note in m.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def check_budgets(plan: Plan, opts: ConvertOptions) -> None:
    totals = plan.totals()
    gpu = totals.get("gpu", 0) if opts.target == "gpu" else 0
    cpu = sum(v for k, v in totals.items() if k != "gpu") + (totals.get("gpu", 0) if opts.target == "cpu" else 0)
    if opts.gpu_mem is not None and gpu > opts.gpu_mem * GIB:
        raise PlanError(
            f"plan does not fit: the GPU side needs {gpu / GIB:.2f} GiB, --gpu-mem is {opts.gpu_mem:g} GiB "
            f"(use --target cpu, or a source with smaller attention/dense tensors)"
        )
    if opts.cpu_mem is not None and cpu > opts.cpu_mem * GIB:
        raise PlanError(f"plan does not fit: the CPU side needs {cpu / GIB:.2f} GiB, --cpu-mem is {opts.cpu_mem:g} GiB")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output folder (required unless --plan).")
@click.option(
    "--target",
    type=click.Choice(["gpu", "cpu"]),
    default=_DEFAULTS.target,
    show_default=True,
    help="gpu: attention, shared expert, dense layers and head on the GPU (Marlin int4); "
    "cpu: every big linear in the CPU layout.",
)
@click.option(
    "--cpu-layout",
    type=click.Choice(list(L.CPU_LAYOUT_CHOICES)),
    default=None,
    help="Layout of routed experts (and CPU linears): ggml keeps the GGUF blocks "
    "losslessly (Q4_K/Q6_K/Q8_0 re-arranged into 16-row lane blocks, other types as they are); ggml-rows keeps "
    "every block byte for byte; amx-* re-quantize into AMX/AVX-512 tiles. [default: ggml for a GGUF, "
    f"{SAFETENSORS_CPU_LAYOUT} for safetensors]",
)
@click.option(
    "--gpu-layout",
    type=click.Choice(["marlin", "bf16"]),
    default=_DEFAULTS.gpu_layout,
    show_default=True,
    help="Layout of GPU-side linears.",
)
@click.option(
    "--group-size",
    type=click.Choice(["32", "64", "128"]),
    default=None,
    help=f"amx-int4 group size along K. [default: {_DEFAULTS.group_size} for a GGUF, "
    f"{SAFETENSORS_GROUP_SIZE} for safetensors]",
)
@click.option(
    "--numa-nodes",
    type=click.IntRange(1, 8),
    default=_DEFAULTS.numa_nodes,
    show_default=True,
    help="Cut routed experts into this many NUMA slices (no weight stored twice).",
)
@click.option(
    "--gpu-mem", type=float, default=None, help="GPU memory budget in GiB; a plan that exceeds it is refused."
)
@click.option("--cpu-mem", type=float, default=None, help="CPU memory budget in GiB (all nodes).")
@click.option(
    "--rules",
    type=click.Path(path_type=Path),
    default=None,
    help="Placement rules TOML (default: DeepSeek-V3).",
)
@click.option("--plan", "plan_only", is_flag=True, help="Print what goes where and the bytes per part; write nothing.")
@click.option("--resume", is_flag=True, help="Continue a killed conversion from its journal.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (or partial conversion).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Print the packing decision of every tensor.")
def main(src: Path, out: Path | None, target: str, cpu_layout: str | None, gpu_layout: str, group_size: str | None,
         numa_nodes: int, gpu_mem: float | None, cpu_mem: float | None, rules: Path | None, plan_only: bool,
         resume: bool, force: bool, quiet: bool, verbose: bool) -> None:  # fmt: skip
    """Pack a DeepSeek-V3/R1 GGUF (one file or a split set) or Hugging Face safetensors checkpoint
    (a folder: BF16, or FP8 with block scales) into a ktpack folder.

    \b
    Examples:
      kt-convert r1-Q4_K_M-00001-of-00009.gguf -o r1-packed/
      kt-convert r1.gguf --plan --target gpu --numa-nodes 2 --gpu-mem 24
      kt-convert r1.gguf -o r1-cpu/ --target cpu --cpu-layout amx-int4
      kt-convert DeepSeek-R1/ -o r1-packed/          # FP8 safetensors: amx-int4 experts
    """
    try:
        if not plan_only and out is None:
            raise click.UsageError("-o/--out is required (or pass --plan)")
        source = open_source(src, plan_only=plan_only)
        opts = ConvertOptions(
            target=target, cpu_layout=cpu_layout or default_cpu_layout(source), gpu_layout=gpu_layout,
            numa_nodes=numa_nodes, gpu_mem=gpu_mem, cpu_mem=cpu_mem,
            group_size=int(group_size) if group_size else default_group_size(source),
            rules=str(rules) if rules else None,
        )  # fmt: skip
        plan = make_plan(source, opts)
        if plan_only or verbose:
            click.echo(format_plan(plan), err=not plan_only)
        check_budgets(plan, opts)
        if plan_only:
            return
        for note in plan.manifest.notes:
            click.echo(f"kt-convert: note: {note}", err=True)
        summary = write(plan, out, force=force, resume=resume, progress=not quiet)
        click.echo(summary.line(out), err=True)
    except PlanError as e:
        click.echo(f"kt-convert: error: {src.name}: {e}", err=True)
        sys.exit(2)
    except (SourceError, ConvertError) as e:
        click.echo(f"kt-convert: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("kt-convert: interrupted; continue with --resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
