#!/usr/bin/env python
"""Make synthetic DeepSeek-V3 test models.

python scripts/make_test_model.py --out DIR                      # tiny: HF + all GGUF variants
python scripts/make_test_model.py --preset bench --out DIR --random-blocks Q4_K_M
python scripts/make_test_model.py --preset bench --out DIR --from-floats BF16 --from-floats Q8_0
python scripts/make_test_model.py --preset r1dims --out DIR --random-blocks Q4_K_M   # R1 layer dims, ~6 GB
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ktpack.convert.synth import PRESETS, make_all, write_float_gguf, write_random_gguf
from ktpack.convert.synth.writer import QTYPES


@click.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--random-blocks",
    type=click.Choice(QTYPES),
    default=None,
    help="write only {preset}-{QTYPE}.gguf with random valid blocks (for speed tests, e.g. bench)",
)
@click.option(
    "--from-floats",
    "from_floats",
    type=click.Choice(QTYPES),
    multiple=True,
    help="write only {preset}-{QTYPE}.gguf (repeatable) from the preset's float weights, quantized tensor by "
    "tensor without an HF folder: every QTYPE is the same model (for greedy agreement between engines)",
)
@click.option("--seed", type=int, default=0, show_default=True)
def main(preset: str, out_dir: Path, random_blocks: str | None, from_floats: tuple[str, ...], seed: int) -> None:
    t0 = time.perf_counter()
    if random_blocks is not None and from_floats:
        raise click.UsageError("--random-blocks and --from-floats are exclusive")
    if from_floats:
        paths = {}
        for q in from_floats:
            (paths[q],) = write_float_gguf(preset, out_dir / f"{preset}-{q}.gguf", q, seed=seed)
    elif random_blocks is not None:
        (path,) = write_random_gguf(preset, out_dir / f"{preset}-{random_blocks}.gguf", random_blocks, seed=seed)
        paths = {random_blocks: path}
    else:
        if preset != "tiny":
            click.echo(f"note: the full HF + GGUF family of {preset!r} is large; consider --random-blocks", err=True)
        paths = make_all(out_dir, preset=preset, seed=seed)
    for key, p in paths.items():
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir())
        click.echo(f"{key}\t{p}\t{size:,} bytes")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s", err=True)


if __name__ == "__main__":
    main()
