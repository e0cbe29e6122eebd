"""The `slattn` command: `slattn demo`, `slattn bench`, `slattn finetune`."""

from __future__ import annotations

import argparse
import sys

from .study.command import add_arguments as finetune_arguments


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: a GPU when slattn has kernels for it, else the CPU)")
    parser.add_argument("--topk", type=float, default=0.05, help="fraction of key blocks computed exactly")
    parser.add_argument("--block-q", type=int, default=64, help="query block size")
    parser.add_argument("--block-k", type=int, default=64, help="key block size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slattn", description="Sparse-Linear Attention for diffusion transformers")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="SLA vs dense attention on a synthetic video attention layer")
    _common(demo)
    demo.add_argument("--full-size", action="store_true",
                      help="use the Wan2.1-1.3B 480p token grid (21x30x52) on the CPU too (slow)")
    demo.add_argument("--json", help="also write the results to this JSON file")

    bench = commands.add_parser("bench", help="time SLA against dense attention; writes JSON and a PNG plot")
    _common(bench)
    bench.add_argument("--shape", action="append", help="B,H,L,D (repeatable); default depends on the device")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="input dtype")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    bench.add_argument("--out-dir", default="slattn-results", help="folder for bench.json and bench.png")
    bench.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                       help="also time FlexAttention on the same block map (default: on a GPU only)")

    finetune_arguments(commands.add_parser(
        "finetune", help="fine-tuning study: full attention vs SLA, SLA2 and the ablations on a video DiT"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import main as run
        elif args.command == "bench":
            from .bench import main as run
        else:
            from .study.command import main as run
        return run(args)
    except (ValueError, NotImplementedError) as error:
        print(f"slattn {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
