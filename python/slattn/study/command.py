"""`slattn finetune`: the command-line face of slattn.study.run_study."""

from __future__ import annotations

import argparse

from .presets import PRESETS
from .variants import VARIANTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="smoke", choices=tuple(PRESETS),
                        help="smoke: the whole pipeline on a CPU in minutes (checks, claims nothing); "
                             "gpu: the study itself, sized for one H100")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: a GPU when slattn has kernels for it, else the CPU)")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--out-dir", default="slattn-results/finetune",
                        help="folder for results.json, report.md, loss_curves.png, samples.png")
    parser.add_argument("--cache-dir", help="folder of the pretrained checkpoint (default: OUT_DIR/cache)")
    parser.add_argument("--pretrain-steps", type=int, help="override the preset's pretraining steps")
    parser.add_argument("--finetune-steps", type=int, help="override the preset's fine-tuning steps per variant")
    parser.add_argument("--seed", type=int, help="override the preset's seed (data, initial weights, noise)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    from .runner import run_study

    overrides = {name: value for name, value in (("pretrain_steps", args.pretrain_steps),
                                                 ("finetune_steps", args.finetune_steps), ("seed", args.seed))
                 if value is not None}
    variants = None if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    run_study(args.preset, device=args.device, out_dir=args.out_dir, cache_dir=args.cache_dir, variants=variants,
              progress=not args.no_progress, **overrides)
    return 0
