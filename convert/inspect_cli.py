"""`kt-inspect PACKED`: what a packed folder holds; verify it; extract tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from ktpack.layouts import manifest as mf
from ktpack.layouts.errors import ManifestError
from ktpack.layouts.tensor_io import tensor_values, verify


def table(m: mf.Manifest) -> str:
    c = m.config
    lines = [
        f"ktpack {m.format_version} · {m.created_by} · source {m.source.get('kind')} "
        f"({', '.join(f['name'] for f in m.source.get('files', []))})",
        f"model: {c.architecture} layers={c.num_hidden_layers} hidden={c.hidden_size} heads={c.num_attention_heads} "
        f"experts={c.n_routed_experts} top-{c.num_experts_per_tok} vocab={c.vocab_size} attention={c.attention_layout}",
        f"options: {' '.join(f'{k}={v}' for k, v in m.options.items() if v is not None)}",
        "",
    ]
    w = max(len(t.name) for t in m.tensors)
    lines.append(f"{'tensor':<{w}}  {'shape':<18} {'source':<6} {'place':<5} {'layout':<15} {'bytes':>13}  pieces")
    for t in m.tensors:
        where = " ".join(
            f"{p.file}@{p.offset}" + (f"[{p.part}]" if p.part != "data" else "") for p in t.pieces if p.nbytes
        )
        shape = "x".join(map(str, t.shape))
        lines.append(
            f"{t.name:<{w}}  {shape:<18} {t.source_dtype:<6} {t.placement:<5} {t.layout:<15} {t.nbytes():>13,}  {where}"
        )
    lines.append("")
    for f in m.files:
        node = f" node {f.node}" if f.node is not None else ""
        lines.append(f"{f.path:<32} {f.kind:<12}{node:<8} {f.size:>15,} bytes")
    for n in m.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("packed", type=click.Path(path_type=Path), required=False)
@click.option(
    "--machine", is_flag=True, help="Print this machine: chosen ISA and why, AMX permission, NUMA nodes, GPU."
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option(
    "--verify",
    "do_verify",
    is_flag=True,
    help="Check every file size and checksum; exit 1 at the first mismatch.",
)
@click.option("--extract", "extract", metavar="NAME", help="Tensor to write as float32 .npy (source name), or 'all'.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Where --extract writes (a .npy file, or a folder for 'all').",
)
def main(
    packed: Path | None, machine: bool, as_json: bool, do_verify: bool, extract: str | None, out: Path | None
) -> None:
    """Show what a packed folder holds (table, or --json), --verify it, or --extract tensors.

    \b
    Examples:
      kt-inspect packed/
      kt-inspect packed/ --verify
      kt-inspect packed/ --extract blk.3.ffn_up_exps.weight --out up.npy
      kt-inspect packed/ --extract all --out tensors/
      kt-inspect --machine
    """
    if machine:
        from ktpack import kernels

        try:
            click.echo(kernels.machine_report())
        except kernels.IsaError as e:
            click.echo(f"kt-inspect: error: {e}", err=True)
            sys.exit(1)
        if packed is None:
            return
    if packed is None:
        raise click.UsageError("PACKED is required (or pass --machine)")
    try:
        m = mf.load(packed)
    except ManifestError as e:
        click.echo(f"kt-inspect: error: {e}", err=True)
        sys.exit(1)
    if do_verify:
        for problem in verify(packed, m):
            click.echo(f"kt-inspect: verify failed: {problem}", err=True)
            sys.exit(1)
        n = sum(len(t.pieces) for t in m.tensors)
        click.echo(f"kt-inspect: {packed}: {len(m.files)} files and {n} tensor pieces verified")
        return
    if extract:
        if out is None:
            raise click.UsageError("--extract needs --out")
        names = [t.name for t in m.tensors] if extract == "all" else [extract]
        if extract == "all":
            out.mkdir(parents=True, exist_ok=True)
        for name in names:
            try:
                t = m.tensor(name)
            except KeyError:
                click.echo(f"kt-inspect: error: {packed}: no tensor named {name}", err=True)
                sys.exit(1)
            target = out / f"{name}.npy" if extract == "all" else out
            np.save(target, np.ascontiguousarray(tensor_values(packed, t), dtype=np.float32))
        click.echo(f"kt-inspect: wrote {len(names)} tensor(s) to {out}", err=True)
        return
    if as_json:
        click.echo(m.to_json(), nl=False)
    else:
        click.echo(table(m))


if __name__ == "__main__":
    main()
