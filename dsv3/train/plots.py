"""PNG plots for MLflow: loss curves and the expert-load heatmap (layer × expert)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(history: list[dict], val: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        steps = [h["step"] for h in history]
        ax.plot(steps, [h["train/loss"] for h in history], label="train/loss", lw=1)
        if "train/main_loss" in history[0]:
            ax.plot(steps, [h["train/main_loss"] for h in history], label="train/main_loss", lw=1)
        for k in sorted(k for k in history[0] if k.startswith("train/mtp_loss_")):
            ax.plot(steps, [h.get(k, np.nan) for h in history], label=k, lw=1, alpha=0.7)
    for key in ("val/loss", "val/ema_loss"):
        pts = [(v["step"], v[key]) for v in val if key in v]
        if pts:
            ax.plot(*zip(*pts), "o-", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def expert_load_heatmap(load: np.ndarray, title: str = "expert load (fraction of mean)"):
    """load [n_moe_layers, E] token counts -> heatmap of load / mean per layer."""
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * rel.shape[1] + 2), max(2.5, 0.4 * rel.shape[0] + 1.5)))
    im = ax.imshow(rel, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def heatmap(values: np.ndarray, rows: list, cols: list, title: str, xlabel: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.6 * len(rows) + 1.8))
    im = ax.imshow(values, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
