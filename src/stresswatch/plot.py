"""Per-user replay plots: HR and ln RMSSD with the baseline band, window states, episodes,
alerts and labels on one time axis (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .extras import require

STATE_COLOURS = {
    "calibrating": "#bdbdbd",
    "ok": "#8fd18f",
    "elevated": "#e4572e",
    "suppressed_motion": "#6c8ebf",
    "insufficient_data": "#f3f3f3",
}


def _band(frame: pl.DataFrame, value: str, base: str, z: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Baseline and ±2 robust SD, the scale recovered from value, baseline and z."""
    v = frame.get_column(value).cast(pl.Float64).fill_null(np.nan).to_numpy()
    b = frame.get_column(base).cast(pl.Float64).fill_null(np.nan).to_numpy()
    zz = frame.get_column(z).cast(pl.Float64).fill_null(np.nan).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.abs((v - b) / zz)
    scale[~np.isfinite(scale)] = np.nan
    # the scale changes slowly: carry the last known one over windows where z was ~0
    idx = np.where(np.isfinite(scale), np.arange(len(scale)), 0)
    np.maximum.accumulate(idx, out=idx)
    scale = scale[idx]
    return b, b - 2 * scale, b + 2 * scale


def own_slot(window_start: pl.Series, baseline_slots: int) -> pl.Series:
    """The time-of-day slot a window belongs to (UTC), as the detector computes it."""
    seconds = window_start.dt.hour().cast(pl.Int64) * 3600 + window_start.dt.minute().cast(pl.Int64) * 60 + window_start.dt.second().cast(pl.Int64)
    return seconds // (86400 // baseline_slots)


def neighbour_mask(windows: pl.DataFrame, baseline_slots: int) -> np.ndarray:
    """True for the windows scored against a neighbouring slot's baseline, not their own."""
    if not windows.height or "baseline_slot" not in windows.columns:
        return np.zeros(windows.height, dtype=bool)
    used = windows.get_column("baseline_slot")
    return ((used != own_slot(windows.get_column("window_start"), baseline_slots)) & used.is_not_null()).to_numpy()


def page_notes(windows: pl.DataFrame, *, baseline_slots: int, consent_given: bool) -> tuple[str, int]:
    """The sentence under the title that says what the baseline line is (and how many windows
    were compared with a neighbouring slot), and whether consent was known; and that count."""
    n_neighbour = int(neighbour_mask(windows, baseline_slots).sum())
    hours = 24 // baseline_slots
    note = (
        f"Baseline: the person's own, per {hours}-h time-of-day slot (UTC). "
        + (
            f"{n_neighbour} window(s) were compared with a neighbouring slot's baseline (the least alarming one, "
            "e.g. an early wake-up against the night), drawn there as dots."
            if n_neighbour
            else "Every window was compared with its own slot."
        )
    )
    if not consent_given:
        note += " No consent database given (--consent-db): every alert counts as not consented."
    return note, n_neighbour


def plot_user(
    user: str,
    windows: pl.DataFrame,
    alerts: pl.DataFrame,
    labels: pl.DataFrame | None,
    path: Path,
    *,
    baseline_slots: int = 4,
    consent_given: bool = True,
) -> Path:
    matplotlib = require("matplotlib", extra="plot", feature="replay --plot")
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    w = windows.filter(pl.col("user") == user).sort("window_start")
    a = alerts.filter(pl.col("user") == user)
    lab = labels.filter(pl.col("user") == user) if labels is not None else None
    mid = (w.get_column("window_start") + (w.get_column("window_end") - w.get_column("window_start")) / 2).to_list()

    fig, (ax_hr, ax_hrv, ax_state) = plt.subplots(
        3, 1, figsize=(14, 7), sharex=True, gridspec_kw={"height_ratios": [3, 3, 0.6]}, constrained_layout=True
    )
    note, _ = page_notes(w, baseline_slots=baseline_slots, consent_given=consent_given)
    neighbour = neighbour_mask(w, baseline_slots)
    for ax, value, base, z, label, colour in (
        (ax_hr, "hr_mean", "hr_baseline", "hr_z", "HR (bpm)", "#c0392b"),
        (ax_hrv, "ln_rmssd", "ln_rmssd_baseline", "ln_rmssd_z", "ln RMSSD (ln ms)", "#2c7fb8"),
    ):
        b, lo, hi = _band(w, value, base, z)
        ax.fill_between(mid, lo, hi, color=colour, alpha=0.12, linewidth=0, label="baseline ±2 robust SD")
        ax.plot(mid, b, color=colour, alpha=0.6, linewidth=1, linestyle="--", label="baseline (own time-of-day slot)")
        if neighbour.any():
            ax.plot(
                [m for m, n in zip(mid, neighbour) if n], b[neighbour], linestyle="none", marker=".", markersize=3,
                color="#555555", label="baseline of a neighbouring slot",
            )
        ax.plot(mid, w.get_column(value).to_list(), color=colour, linewidth=0.9, label=label.split(" (")[0])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in (ax_hr, ax_hrv):
        if lab is not None:
            for s, e in lab.select("start", "end").iter_rows():
                ax.axvspan(s, e, color="#f1c40f", alpha=0.25, linewidth=0)
        for s, r in a.select("episode_start", "raised_at").iter_rows():
            ax.axvspan(s, r, color="#e4572e", alpha=0.15, linewidth=0)
            ax.axvline(r, color="#e4572e", linewidth=1.5)
    # legend entries for the shaded spans
    ax_hr.plot([], [], color="#e4572e", linewidth=1.5, label="alert (episode shaded)")
    if lab is not None and lab.height:
        ax_hr.fill_between([], [], color="#f1c40f", alpha=0.4, label="labelled episode")
    ax_hr.legend(loc="upper left", fontsize=8, ncols=5)
    starts = w.get_column("window_start").to_list()
    ends = w.get_column("window_end").to_list()
    for state, colour in STATE_COLOURS.items():
        spans = [(s, e - s) for s, e, st in zip(starts, ends, w.get_column("state").to_list()) if st == state]
        if spans:
            ax_state.broken_barh(
                [(mdates.date2num(s), (d.total_seconds() / 86400)) for s, d in spans], (0, 1), color=colour, label=state
            )
    ax_state.set_yticks([])
    ax_state.set_ylabel("state")
    ax_state.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncols=len(STATE_COLOURS), fontsize=8, frameon=False)
    ax_state.xaxis.set_major_formatter(mdates.DateFormatter("%a %d %b\n%H:%M UTC"))
    sent = int(a.get_column("sent").sum()) if a.height else 0
    consented = f"{sent} consented" if consent_given else "consent unknown (no --consent-db)"
    import textwrap

    title = f"{user}: {w.height} windows, {a.height} alert(s) raised, {consented}"
    fig.suptitle(title + "\n" + textwrap.fill(note, 150), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the page's words also as PNG text, for screen readers and scripts
    fig.savefig(path, dpi=110, metadata={"Software": None, "Title": title, "Description": note})
    plt.close(fig)
    return path


def plot_all(
    windows: pl.DataFrame,
    alerts: pl.DataFrame,
    labels: pl.DataFrame | None,
    out_dir: Path,
    *,
    baseline_slots: int = 4,
    consent_given: bool = True,
) -> list[Path]:
    users = sorted(windows.get_column("user").unique().to_list())
    return [
        plot_user(u, windows, alerts, labels, out_dir / f"{u}.png", baseline_slots=baseline_slots, consent_given=consent_given)
        for u in users
    ]
