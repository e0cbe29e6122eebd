"""scripts/ncu_stalls.py on a small CSV shaped like Nsight Compute's source page."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ncu_stalls.py"
HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_long_sb", "stall_long_sb (Not Issued)",
          "stall_barrier"]


def load_script():
    spec = importlib.util.spec_from_file_location("ncu_stalls", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_csv(path: Path) -> None:
    rows = [["Kernel Name", "first_kernel(args)"], HEADER]
    # Two windows of two instructions: the first holds 90% of the samples, on global loads.
    rows += [["0x0", "LDG.E.64 R2, [R4]", "40", "40", "40", "0"],
             ["0x10", "@!P0 FADD R1, R2, R3", "50", "50", "50", "0"],
             ["0x20", "BAR.SYNC.DEFER_BLOCKING 0x1", "6", "0", "0", "6"],
             ["0x30", "HGMMA.64x128x16.F32.BF16", "4", "0", "0", "4"]]
    rows += [["Kernel Name", "second_kernel(args)"], HEADER, ["0x0", "STG.E [R2], R4", "0", "0", "0", "0"]]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_windows_shares_and_reasons(tmp_path, capsys):
    path = tmp_path / "sass.csv"
    write_csv(path)
    script = load_script()
    with path.open(newline="") as f:
        found = script.kernels(csv.reader(f))
    assert [name for name, _, _ in found] == ["first_kernel(args)", "second_kernel(args)"]
    assert script.opcode("@!P0 FADD R1, R2, R3") == "FADD"
    name, header, rows = found[0]
    script.report(name, header, rows, window=2)
    lines = capsys.readouterr().out.splitlines()
    assert "100 samples, 4 instructions" in lines[1]
    assert lines[2].split()[:2] == ["0", "90.0%"] and "long_sb 100%" in lines[2] and "'LDG.E.64': 1" in lines[2]
    assert lines[3].split()[:2] == ["2", "10.0%"] and "barrier 100%" in lines[3] and "HGMMA" in lines[3]
    name, header, rows = found[1]
    script.report(name, header, rows, window=2)  # no samples: the kernel's line and nothing else
    assert len(capsys.readouterr().out.splitlines()) == 2
