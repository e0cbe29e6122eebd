"""Where a kernel's warps wait, by stretch of its machine code: reads the CSV of
Nsight Compute's source page (warp-stall samples per SASS instruction) and prints,
per window of instructions holding at least 1% of a kernel's samples, its share,
the memory, barrier and tensor-core instructions in it and its two main stall
reasons. A window of loads followed by stalls on "long_sb" is waiting on global
memory; "lg" on the load/store queue; a SYNCS try-wait on a pipeline barrier.

Usage (on the GPU machine; `bash scripts/gpu_check.sh stalls` runs both steps):
  ncu -k regex:KERNEL -c 1 --section WarpStateStats --section SourceCounters \\
      --import-source no --page source --print-source sass --csv \\
      python3 scripts/profile_sla.py 1,12,32760,128 0.05 128 > sass.csv
  python3 scripts/ncu_stalls.py sass.csv [window]"""

import csv
import sys
from collections import Counter

NOTED = ("LDG", "STG", "LDS", "STS", "HGMMA", "WARPGROUP", "SYNCS", "BAR", "MUFU", "RED", "SHFL", "UTMALDG")


def kernels(rows):
    """(name, header, instruction rows) per kernel of the CSV."""
    found, header = [], None
    for row in rows:
        if row and row[0] == "Kernel Name":
            found.append((row[1], None, []))
        elif row and row[0] == "Address" and found:
            found[-1] = (found[-1][0], row, found[-1][2])
        elif row and found and found[-1][1] is not None:
            found[-1][2].append(row)
    return found


def opcode(source: str) -> str:
    words = source.split()
    return words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")


def report(name, header, rows, window: int) -> None:
    samples = header.index("Warp Stall Sampling (All Samples)")
    source = header.index("Source")
    reasons = [i for i, column in enumerate(header) if column.startswith("stall_") and "Not Issued" not in column]
    total = sum(float(row[samples] or 0) for row in rows)
    print(f"== {name[:110]}\n   {total:.0f} samples, {len(rows)} instructions")
    for start in range(0, len(rows), window):
        chunk = rows[start:start + window]
        share = sum(float(row[samples] or 0) for row in chunk)
        if total == 0 or share / total < 0.01:
            continue
        ops = Counter(opcode(row[source]) for row in chunk)
        noted = {op: n for op, n in ops.items() if op.split(".")[0] in NOTED}
        stalls = Counter()
        for row in chunk:
            for i in reasons:
                stalls[header[i][len("stall_"):]] += float(row[i] or 0)
        top = ", ".join(f"{reason} {count / share:.0%}" for reason, count in stalls.most_common(2))
        print(f"   {start:6d} {share / total:6.1%}  {top:<32} {noted}")


def main() -> None:
    path = sys.argv[1]
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    with open(path, newline="") as f:
        for name, header, rows in kernels(csv.reader(f)):
            if header is not None:
                report(name, header, rows, window)


if __name__ == "__main__":
    main()
