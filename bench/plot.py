"""The benchmark's ratios as a PNG: gateway / each target, per workload (matplotlib)."""

from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install -e '.[bench]'"


def unavailable() -> str | None:
    """Why no plot can be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"matplotlib is not installed ({INSTALL_HINT})"
    return None


def write(
    ratios: dict[str, dict[str, float]], labels: dict[str, str], path: Path, title: str
) -> None:
    """ratios: workload -> reference target -> gateway / that target (lower is better).
    One group of horizontal bars per workload, one bar per reference, a line at 1."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt

    workloads = list(ratios)
    refs = [r for r in labels if any(r in row for row in ratios.values())]
    height = 0.8 / max(len(refs), 1)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.18 * len(workloads) * max(len(refs), 1)))
    for i, ref in enumerate(refs):
        positions = [w + i * height for w in range(len(workloads))]
        values = [ratios[w].get(ref, 0.0) for w in workloads]
        ax.barh(positions, values, height, label=f"gateway / {labels[ref]}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([w + height * (len(refs) - 1) / 2 for w in range(len(workloads))])
    ax.set_yticklabels([w.replace("_", " ") for w in workloads])
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xscale("log")  # ratios: 0.5x and 2x sit at the same distance from 1
    ax.set_xlabel("gateway / target (median; lower is better; log scale)")
    ax.set_title(title)
    # Below the axes, so that it never hides a bar.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncols=2, fontsize="small")
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
