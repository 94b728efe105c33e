"""Plots of a run: losses, mAP/CMC over epochs, the last CMC curve, and A*hs(theta) per tensor.

The factor plot is the paper's characteristic picture: one line per regularized tensor, coloured
by depth in the network, showing how each layer's learned L2 coefficient decays.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .runs import JsonlLog  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(records: list[dict], path: Path) -> None:
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted(k for k in records[0] if k.startswith(("ce_", "triplet_"))):
        ax1.plot(steps, [r.get(key) for r in records], label=key, lw=1)
    ax1.plot(steps, [r["total"] for r in records], label="total", color="k", lw=1.5)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7, ncol=2)
    ax1.set_title("losses")
    if "regularization" in records[0]:
        ax2.plot(steps, [r["regularization"] for r in records], color="tab:purple")
        ax2.set_title("adaptive L2 penalty")
    ax2b = ax2.twinx()
    ax2b.plot(steps, [r["lr"] for r in records], color="tab:gray", ls="--", lw=1)
    ax2b.set_ylabel("learning rate", color="tab:gray")
    ax2b.set_yscale("log")
    ax2.set_xlabel("step")
    _save(fig, path)


def plot_metrics(records: list[dict], path: Path) -> None:
    test = [r for r in records if r.get("split") == "test"]
    if not test:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in test]
    for key, style in (("mAP", "-o"), ("rank1", "-s"), ("rank5", "--"), ("rank10", ":")):
        if key in test[0]:
            ax.plot(epochs, [r[key] for r in test], style, label=key, ms=3)
    if "rr_mAP" in test[0]:
        ax.plot(epochs, [r["rr_mAP"] for r in test], "-^", label="mAP re-ranked", ms=3)
    valid = [r for r in records if r.get("split") == "valid"]
    if valid:
        ax.plot([r["epoch"] for r in valid], [r["mAP"] for r in valid], "-.", label="valid mAP")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("test metrics")
    _save(fig, path)


def plot_cmc(metrics: dict, path: Path) -> None:
    cmc = metrics.get("cmc")
    if not cmc:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    ranks = range(1, len(cmc) + 1)
    ax.plot(ranks, cmc, label=f"mAP {metrics['mAP']:.3f}")
    if metrics.get("rr_cmc"):
        ax.plot(ranks, metrics["rr_cmc"], label=f"re-ranked, mAP {metrics['rr_mAP']:.3f}")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("CMC")
    _save(fig, Path(path))


def plot_factors(records: list[dict], names: list[str], path: Path) -> None:
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    n = len(records[0]["factors"])
    cmap = plt.get_cmap("viridis")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for i in range(n):
        ax.plot(epochs, [r["factors"][i] for r in records], color=cmap(i / max(n - 1, 1)), lw=0.7, alpha=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("A * hs(theta)")
    ax.set_title(f"adaptive factor of each of the {n} regularized tensors (colour: depth)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n - 1))
    fig.colorbar(sm, ax=ax, label="tensor index (input -> heads)")
    last = records[-1]["factors"]
    ax2.bar(range(n), last, color=[cmap(i / max(n - 1, 1)) for i in range(n)], width=1.0)
    ax2.set_xlabel("tensor index")
    ax2.set_title(f"factors at epoch {records[-1]['epoch']}")
    if names and len(names) == n:
        ticks = [i for i in range(n) if i == 0 or names[i].split(".")[0] != names[i - 1].split(".")[0]]
        ax2.set_xticks(ticks)
        ax2.set_xticklabels([names[i].split(".")[0] for i in ticks], rotation=60, fontsize=7)
    _save(fig, path)


def plot_run(run: str | Path) -> Path:
    """Write every plot of ``run`` into ``run/plots`` and return that folder."""
    run = Path(run)
    out = run / "plots"
    plot_losses(JsonlLog(run / "losses.jsonl").read(), out / "losses.png")
    metrics = JsonlLog(run / "metrics.jsonl").read()
    plot_metrics(metrics, out / "metrics.png")
    test = [r for r in metrics if r.get("split") == "test"]
    if test:
        plot_cmc(test[-1], out / "cmc.png")
    names_file = run / "factor_names.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else []
    plot_factors(JsonlLog(run / "factors.jsonl").read(), names, out / "factors.png")
    return out
