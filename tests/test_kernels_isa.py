"""ISA choice of the native engine: detected from CPUID and the OS, forced lower with KTPACK_ISA,
and refused with the reason when forced to something the machine lacks (never a SIGILL)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ktpack import kernels


@pytest.mark.parametrize("name", kernels.ISAS)
def test_forced_isa_taken_or_refused(monkeypatch, name):
    monkeypatch.setenv(kernels.ENV, name)
    ok, why = kernels.supported(name)
    if ok:
        assert kernels.isa() == name
    else:
        with pytest.raises(kernels.IsaError, match=f"{kernels.ENV}={name} cannot run on this machine: .+"):
            kernels.isa()
        assert why


def test_unknown_isa_refused(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "sse9")
    with pytest.raises(kernels.IsaError, match="not one of ref, avx2, avx512, amx"):
        kernels.isa()


def test_best_is_highest_supported(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    ok = [n for n in kernels.ISAS if kernels.supported(n)[0]]
    assert ok[0] == "ref" and kernels.isa() == ok[-1]
    # the ladder is monotone: a higher ISA is never supported without the lower ones
    assert ok == list(kernels.ISAS[: len(ok)])


def test_kt_inspect_machine():
    r = subprocess.run(
        [sys.executable, "-m", "ktpack.convert.inspect_cli", "--machine"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ISA: ") and "NUMA nodes:" in r.stdout and "amx:" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "ktpack.convert.inspect_cli", "--machine"],
        capture_output=True, text=True, env={"KTPACK_ISA": "bogus", "PATH": ""},
    )  # fmt: skip
    assert r.returncode == 1 and "KTPACK_ISA='bogus'" in r.stderr
