"""The `fastpo bench --png` figure: one panel row per case (op, dtype, shape), a bar per
implementation, each labelled with its median time and its speed-up over the best peer."""
from __future__ import annotations

__all__ = ["plot_results", "is_fastpo"]

_FASTPO_PREFIXES = ("fastpo", "linear+fastpo")


def is_fastpo(impl: str) -> bool:
    return impl.startswith(_FASTPO_PREFIXES)


def _groups(results):
    groups: dict[tuple, list] = {}
    for r in results:
        if "interpreter" in r.note:  # a correctness path, not a speed result
            continue
        groups.setdefault((r.op, r.dtype, r.shape.split(" ")[0], " ".join(r.shape.split(" ")[1:])), []).append(r)
    return groups


def plot_results(results, path: str) -> bool:
    """Write the figure to ``path``; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullFormatter
    except ImportError:
        return False
    groups = _groups(results)
    rows = sum(len(g) for g in groups.values()) + 1.2 * len(groups)
    fig, ax = plt.subplots(figsize=(11, 0.26 * rows + 1.0))
    y, ticks, labels = 0.0, [], []
    worst = max(r.median_ms for g in groups.values() for r in g)
    best_all = min(r.median_ms for g in groups.values() for r in g)
    for (op, dtype, shape, extra), group in groups.items():
        peers = [r.median_ms for r in group if not is_fastpo(r.impl)]
        best_peer = min(peers) if peers else None
        ax.text(best_all * 0.8, y - 0.9, f"{op}  {dtype}  {shape} {extra}".strip(), fontsize=8, weight="bold",
                va="center")
        for r in group:
            reference = r.impl.startswith("fastpo[torch]")  # the eager reference backend
            color = "tab:orange" if is_fastpo(r.impl) and not reference else ("navajowhite" if reference else "tab:gray")
            ax.barh(y, r.median_ms, color=color, height=0.8)
            text = f"{r.median_ms:.1f} ms"
            if best_peer is not None and is_fastpo(r.impl):
                text += f"  ({best_peer / r.median_ms:.1f}x best peer)"
            ax.text(r.median_ms * 1.03, y, text, fontsize=7, va="center")
            ticks.append(y)
            labels.append(r.impl)
            y += 1.0
        y += 1.2
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    grid = [v for v in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if best_all / 2 <= v <= worst * 3]
    ax.xaxis.set_major_locator(FixedLocator(grid))
    ax.set_xticklabels([f"{v:g}" for v in grid])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(best_all * 0.6, worst * 3)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("forward + backward, median ms (log scale; orange = fastpo, light = fastpo's eager torch "
                  "reference, gray = peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
