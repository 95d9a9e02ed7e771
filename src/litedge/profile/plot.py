"""--plot: latency vs resolution on log-log axes, one line per bundle, and operator-share bars."""

from __future__ import annotations

from pathlib import Path

from litedge.errors import LitedgeError
from litedge.profile.measure import BundleProfile
from litedge.safe_write import check_target, write_file


def plot_profiles(profiles: list[BundleProfile], out: str | Path) -> Path:
    """Write a PNG: left, transformer step time (ms) vs image pixels per bundle (log-log);
    right, each bundle's operator-group shares at its largest size (when profiled with --ops)."""
    check_target(out, "--plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LitedgeError("--plot needs matplotlib: pip install matplotlib") from None
    with_ops = [(p, max((s for s in p.sizes if s.op_groups), key=lambda s: s.height * s.width, default=None))
                for p in profiles]
    with_ops = [(p, s) for p, s in with_ops if s is not None]
    fig, axes = plt.subplots(1, 2 if with_ops else 1, figsize=(12 if with_ops else 6.5, 4.8), squeeze=False)
    ax = axes[0][0]
    for profile in profiles:
        pixels = [s.height * s.width for s in profile.sizes]
        step_ms = [s.components["transformer_step"].median * 1e3 for s in profile.sizes]
        ax.plot(pixels, step_ms, marker="o", label=f"{profile.bundle} ({profile.family})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image pixels (height x width)")
    ax.set_ylabel("transformer step, median ms")
    dev = profiles[0].device
    ax.set_title(f"{dev['cpu']} ({dev['cores']} cores), {dev['provider']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if with_ops:
        ax = axes[0][1]
        groups = sorted({g for _, s in with_ops for g in s.op_groups})
        bottoms = [0.0] * len(with_ops)
        for group in groups:
            shares = [100 * s.op_groups.get(group, 0) / sum(s.op_groups.values()) for _, s in with_ops]
            ax.bar(range(len(with_ops)), shares, bottom=bottoms, label=group)
            bottoms = [b + v for b, v in zip(bottoms, shares)]
        ax.set_xticks(range(len(with_ops)), [f"{p.bundle}\n{s.height}x{s.width}" for p, s in with_ops], fontsize=8)
        ax.set_ylabel("% of transformer kernel time")
        ax.set_title("operator groups", fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    try:
        write_file(out, lambda f: fig.savefig(f, format="png", dpi=120), what="--plot")
    finally:
        plt.close(fig)
    return Path(out)
