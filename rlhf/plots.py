"""The pictures people look at in the MLflow dashboard (matplotlib figures, logged as PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def ppo_curves(history: list[dict]):
    """Reward-model score, gold (when known) and KL per PPO iteration."""
    panels = [("score", "reward-model score"), ("gold", "gold reward"), ("kl", "KL to reference (nats/seq)")]
    panels = [(key, title) for key, title in panels if key in history[0]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    iterations = [h["iteration"] for h in history]
    for axis, (key, title) in zip(axes, panels):
        axis.plot(iterations, [h[key] for h in history])
        axis.set_title(title)
        axis.set_xlabel("PPO iteration")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def distributions(values: dict[str, list[float]], title: str):
    """Overlaid histograms, e.g. scores of SFT and PPO responses."""
    figure, axis = plt.subplots(figsize=(5, 3.4))
    for label, series in values.items():
        axis.hist(series, bins=20, alpha=0.55, label=f"{label} (mean {sum(series) / len(series):+.2f})")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    return figure


def accuracy_bars(before: float, after: float):
    """The reward model's held-out pair accuracy before and after training."""
    figure, axis = plt.subplots(figsize=(4, 3.2))
    bars = axis.bar(["before", "after"], [before, after], color=["#999999", "#3574b3"])
    axis.bar_label(bars, fmt="%.3f")
    axis.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    axis.set_ylim(0, 1.05)
    axis.set_title("reward model: held-out pair accuracy")
    figure.tight_layout()
    return figure
