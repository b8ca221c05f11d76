"""``edgekit fleet plot``: a device's latency percentiles and input drift over time (PNG, matplotlib Agg)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

from ..errors import EdgekitError


def plot_device(store, fleet: str, device: str, out: Path, since: Optional[float] = None,
                psi_threshold: Optional[float] = None, p99_budget_ms: Optional[float] = None) -> dict:
    """Write ``out``: p50/p99 latency (top) and drift PSI (bottom) per telemetry window; returns what was drawn
    (``left_out``: rows an older edgekit stored with a device time out of range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    rows = store.series(fleet, device, since)
    if not rows:
        raise EdgekitError(f"{device} has no telemetry in {store.path}"
                           + (" since the given time" if since is not None else ""))
    times = [dt.datetime.fromtimestamp(r[0]) for r in rows]
    p50 = [r[1] for r in rows]
    p99 = [r[2] for r in rows]
    psi = [r[3] for r in rows]
    hist = [bool(r[4]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, constrained_layout=True)
    ax1.plot(times, p50, marker=".", lw=1, label="p50")
    ax1.plot(times, p99, marker=".", lw=1, label="p99")
    replayed = [t for t, h in zip(times, hist) if h]
    if replayed:
        ax1.plot(replayed, [v for v, h in zip(p99, hist) if h], "o", mfc="none", color="grey",
                 label="replayed (historical)")
    if p99_budget_ms:
        ax1.axhline(p99_budget_ms, color="red", ls="--", lw=1, label=f"p99 budget {p99_budget_ms:g} ms")
    ax1.set_ylabel("latency per window (ms)")
    left_out = getattr(store, "last_left_out", 0)
    ax1.set_title(f"{fleet}/{device}: {len(rows)} telemetry windows"
                  + (f" ({left_out} stored with a device time out of range, not drawn)" if left_out else ""))
    ax1.legend(loc="upper left")
    ax1.grid(alpha=0.3)
    have_psi = any(v is not None for v in psi)
    ax2.plot(times, [v if v is not None else float("nan") for v in psi], marker=".", lw=1, color="tab:purple",
             label="input drift PSI (max over inputs)")
    if psi_threshold:
        ax2.axhline(psi_threshold, color="red", ls="--", lw=1, label=f"alert threshold {psi_threshold:g}")
    ax2.set_ylabel("PSI")
    ax2.legend(loc="upper left")
    ax2.grid(alpha=0.3)
    if not have_psi:
        ax2.text(0.5, 0.5, "no drift figures (the device reports none)", transform=ax2.transAxes,
                 ha="center", va="center", color="grey")
    ax2.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"out": str(out), "windows": len(rows), "historical": sum(hist), "with_drift": sum(v is not None for v in psi),
            "left_out": left_out}
