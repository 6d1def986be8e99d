#!/usr/bin/env python3
"""Measure kt-convert: wall time, MB/s and peak private memory (RssAnon) of one conversion.

RssAnon is sampled from /proc/<pid>/status every few milliseconds (the kernel keeps no peak of it);
mapped source pages and the page cache of written files are file-backed and do not count.

    python scripts/measure_convert.py models/bench/bench-Q4_K_M.gguf --target cpu [--repeat 3]
    python scripts/measure_convert.py r1-slice/fp8/ --repeat 1        # a safetensors folder
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_once(src: Path, args: list[str]) -> dict:
    from ktpack.convert.gguf_source import split_set

    if src.is_dir():  # a safetensors checkpoint
        src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    else:
        src_bytes = sum(p.stat().st_size for p in split_set(src))
    out = Path(tempfile.mkdtemp(prefix="ktpack-measure-")) / "out"
    cmd = [sys.executable, "-m", "ktpack.convert.cli", str(src), "-o", str(out), "-q", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    peak = {"anon": 0, "hwm": 0}

    def sample() -> None:
        while proc.poll() is None:
            a = _status_kb(proc.pid, "RssAnon")
            h = _status_kb(proc.pid, "VmHWM")
            if a:
                peak["anon"] = max(peak["anon"], a)
            if h:
                peak["hwm"] = max(peak["hwm"], h)
            time.sleep(0.003)

    th = threading.Thread(target=sample)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode:
        raise SystemExit(f"kt-convert failed: {err.strip()}")
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out.parent)
    return {
        "source_bytes": src_bytes,
        "output_bytes": out_bytes,
        "wall_s": wall,
        "mb_per_s": src_bytes / 1e6 / wall,
        "peak_rss_anon_mb": peak["anon"] / 1024,
        "peak_rss_mb": peak["hwm"] / 1024,
        "summary": err.strip().splitlines()[-1] if err.strip() else "",
    }


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--repeat", default=3, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path))
@click.argument("convert_args", nargs=-1, type=click.UNPROCESSED)
def main(src: Path, repeat: int, json_out: Path | None, convert_args: tuple[str, ...]) -> None:
    runs = [measure_once(src, list(convert_args)) for _ in range(repeat)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "mb_per_s", "peak_rss_anon_mb", "peak_rss_mb")}
    print(
        f"{src.name} {' '.join(convert_args)}: {runs[0]['source_bytes'] / 1e6:.1f} MB source, "
        f"median of {repeat}: {med['wall_s']:.2f} s, {med['mb_per_s']:.0f} MB/s, "
        f"peak RssAnon {med['peak_rss_anon_mb']:.0f} MB (peak RSS incl. mapped file pages {med['peak_rss_mb']:.0f} MB)"
    )
    if json_out:
        json_out.write_text(json.dumps({"runs": runs, "median": med}, indent=1))


if __name__ == "__main__":
    main()
