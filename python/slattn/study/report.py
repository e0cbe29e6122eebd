"""The study's report: Markdown tables, and PNG plots (loss curves, sample grids)
when matplotlib is installed."""

from __future__ import annotations

import torch

from .._plots import pyplot, save

SAMPLES_SHOWN = 2      # clips per row of the sample grid
FRAMES_SHOWN = 4       # frames per clip, evenly spaced


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _number(value, digits=4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def tables(results: dict) -> str:
    """The summary table and the validation loss by timestep, as Markdown."""
    variants = results["variants"]
    lines = ["| variant | target sparsity | measured sparsity | attention FLOPs (of full) | val loss, no fine-tune "
             "| val loss, fine-tuned | rFVD ↓ | step time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in variants.items():
        if r["status"] != "ran":
            lines.append(f"| {name} | {_percent(r['target_sparsity'])} | not run: {r['reason']} "
                         f"| | | | | |")
            continue
        flops = r["attention_flops"]
        lines.append(f"| {name} | {_percent(r['target_sparsity'])} | {_percent(r['sparsity'])} "
                     f"| {flops['total'] / 1e9:.2f} GFLOP ({_percent(flops['fraction_of_full'])}) "
                     f"| {_number(r['val_loss_before_mean'])} | {_number(r['val_loss_mean'])} "
                     f"| {_number(r['rfvd'], 3)} | {1e3 * r['step_seconds']:.0f} ms |")
    floor = results["quality"]["real_floor"]
    lines.append("")
    lines.append(f"rFVD of real held-out clips against the reference set (the floor at this sample size): "
                 f"{floor:.3f}. Pretrained full-attention model: val loss {results['pretrain']['val_loss_mean']:.4f}, "
                 f"rFVD {results['pretrain']['rfvd']:.3f}.")
    ran = {name: r for name, r in variants.items() if r["status"] == "ran"}
    if ran:
        keys = list(next(iter(ran.values()))["val_loss"])
        lines += ["", "Validation loss (velocity MSE, fixed noise) by timestep, after fine-tuning:", "",
                  "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, r in ran.items():
            lines.append(f"| {name} | " + " | ".join(_number(r["val_loss"][k]) for k in keys) + " |")
    return "\n".join(lines)


def _smooth(values: list[float]) -> list[float]:
    window = max(1, len(values) // 20)
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_losses(results: dict, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(_smooth(results["pretrain"]["losses"]), color="black")
    left.set_title("pretraining, full attention")
    for name, r in results["variants"].items():
        if r["status"] == "ran":
            right.plot(_smooth(r["train_losses"]), label=name)
    right.set_title("fine-tuning from the pretrained model")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (velocity MSE, moving average)")
        ax.set_yscale("log")
    right.legend()
    save(plt, fig, path, dpi=110)
    return True


def plot_samples(rows: dict[str, torch.Tensor], path: str) -> bool:
    """rows: label -> clips (N, 3, T, H, W) in [-1, 1]; the first SAMPLES_SHOWN clips of each, FRAMES_SHOWN frames."""
    plt = pyplot()
    if plt is None:
        return False
    frames = next(iter(rows.values())).shape[2]
    shown = sorted({round(i * (frames - 1) / max(1, FRAMES_SHOWN - 1)) for i in range(FRAMES_SHOWN)})
    columns = [(clip, frame) for clip in range(SAMPLES_SHOWN) for frame in shown]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.3 * len(columns), 1.4 * len(rows)), squeeze=False)
    for row, (label, clips) in zip(axes, rows.items()):
        for ax, (clip, frame) in zip(row, columns):
            if clip < len(clips):
                ax.imshow(((clips[clip, :, frame].permute(1, 2, 0).float().cpu() + 1) / 2).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(label, rotation=0, ha="right", va="center")
    for ax, (clip, frame) in zip(axes[0], columns):
        ax.set_title(f"clip {clip}, frame {frame}", fontsize=7)
    save(plt, fig, path, dpi=100)
    return True
