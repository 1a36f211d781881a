"""Frequency-domain HRV per window: Lomb-Scargle on the uneven RR series, many windows at once.

Pure array code: beats (time in s, RR in ms) sorted by window, with the first row of each
window, in; per window arrays out. No loop runs per window or per beat: each block of
windows' beats is turned into one (frequencies x beats) matrix of phasors, and the sums the
periodogram needs are segment reductions (``np.add.reduceat``) over its columns. The only
Python loop is over the frequencies of the grid (the phasor recurrence), per block of beats.

Conventions (stated because libraries differ):

* **Periodogram**: the floating-mean ("generalised") Lomb-Scargle periodogram (Zechmeister &
  Kürster 2009), the default model of ``astropy.timeseries.LombScargle`` (``fit_mean=True``,
  ``center_data=True``), in its ``normalization="psd"`` units: ``P(f) = N/2 · (YCτ²/CCτ +
  YSτ²/SSτ)`` with the weighted means of the centred RR over the window's N beats (ms²). This
  is what NeuroKit2's ``hrv_frequency(psd_method="lomb", normalize=False)`` integrates.
* **Time**: each beat's own timestamp (the end of its interval), so gaps left by removed
  beats stay gaps (no interpolation).
* **Band power**: trapezoid rule over the grid frequencies ``lo <= f < hi`` (NeuroKit2's
  ``signal_power``): LF 0.04-0.15 Hz, HF 0.15-0.40 Hz.
* **Units of the window columns** (``lf_ms2``, ``hf_ms2``): ms², i.e. the periodogram scaled
  to a one-sided density, ``PSD(f) = 2 · P(f) · mean RR (s)`` (ms²/Hz), so that a sinusoidal
  RR modulation of amplitude A ms gives band power A²/2 (its variance), as a Welch PSD
  would. NeuroKit2's "lomb" band powers are the unscaled ``∫P df`` (ms²·Hz, and by default
  further divided by the spectrum's maximum); the benchmark converts.
* **Grid**: ``f0_hz + k · df_hz`` for ``k < n_freq``; by default LF and HF are read from
  0.04 Hz up at ``df = 1 / (2 · window_s)`` (two points per independent frequency).
* ``lf_hf``: ``lf_ms2 / hf_ms2``. NaN where the window has fewer than ``MIN_BEATS`` beats or
  a band has no power.
"""

from __future__ import annotations

import numpy as np

LF_HZ = (0.04, 0.15)
HF_HZ = (0.15, 0.40)
MIN_BEATS = 16  # fewer beats than this cannot resolve 0.04 Hz (25 s) at all
OVERSAMPLE = 2  # grid points per independent frequency (1 / window length)
BLOCK_CELLS = 1 << 15  # frequencies x beats per block: the phasor matrices stay ~16 MB


def _block_ranges(starts: np.ndarray, n: int, n_freq: int) -> list[tuple[int, int]]:
    """Runs of whole segments with about BLOCK_CELLS / n_freq beats each: (first seg, end seg)."""
    per = max(1, BLOCK_CELLS // max(n_freq, 1))
    out = []
    s0, nseg = 0, len(starts)
    while s0 < nseg:
        s1 = max(int(np.searchsorted(starts, starts[s0] + per, side="right")), s0 + 1)
        out.append((s0, min(s1, nseg)))
        s0 = s1
    return out


def lomb_scargle(
    t_s: np.ndarray,
    y: np.ndarray,
    starts: np.ndarray,
    f0_hz: np.ndarray | float,
    df_hz: np.ndarray | float,
    n_freq: int,
) -> np.ndarray:
    """Floating-mean Lomb-Scargle power (astropy ``normalization="psd"``) per segment.

    ``t_s``, ``y``: rows sorted by segment, time order inside; ``starts``: first row of each
    (non-empty) segment. ``f0_hz``, ``df_hz``: the grid, one value for all segments or one
    per segment. Returns ``(n_segments, n_freq)``; NaN where a segment has fewer than 3 rows.
    """
    t_s = np.asarray(t_s, np.float64)
    y = np.asarray(y, np.float64)
    starts = np.asarray(starts, np.int64)
    nseg, n = len(starts), len(t_s)
    out = np.full((nseg, n_freq), np.nan)
    if nseg == 0 or n_freq == 0:
        return out
    f0 = np.broadcast_to(np.asarray(f0_hz, np.float64), (nseg,))
    df = np.broadcast_to(np.asarray(df_hz, np.float64), (nseg,))
    ends = np.append(starts[1:], n)
    blocks = _block_ranges(starts, n, n_freq)
    widest = max(int(ends[s1 - 1] - starts[s0]) for s0, s1 in blocks)
    zbuf = np.empty((n_freq, widest), np.complex128)  # reused: no page faults per block
    ybuf = np.empty_like(zbuf)
    for s0, s1 in blocks:
        r0, r1 = int(starts[s0]), int(ends[s1 - 1])
        st = starts[s0:s1] - r0
        lengths = ends[s0:s1] - starts[s0:s1]
        cnt = lengths.astype(np.float64)
        # time from the segment's first beat (the periodogram does not depend on the origin;
        # small phases keep the recurrence exact to ~1e-13)
        t = t_s[r0:r1] - np.repeat(t_s[starts[s0:s1]], lengths)
        yc = y[r0:r1] - np.repeat(np.add.reduceat(y[r0:r1], st) / cnt, lengths)
        w0 = np.repeat(2 * np.pi * f0[s0:s1], lengths)
        dw = np.repeat(2 * np.pi * df[s0:s1], lengths)
        step = np.exp(1j * dw * t)
        z = zbuf[:, : r1 - r0]
        z[0] = np.exp(1j * w0 * t)
        m = 1  # doubling: z[m:2m] = z[:m] · step^m (log2 n_freq array operations)
        while m < n_freq:
            c = min(m, n_freq - m)
            np.multiply(z[:c], step, out=z[m : m + c])
            m += c
            step = step * step
        e1 = np.add.reduceat(z, st, axis=1) / cnt  # mean e^{iωt}: C + iS
        zy = ybuf[:, : r1 - r0]
        np.multiply(z, yc, out=zy)
        ye = np.add.reduceat(zy, st, axis=1) / cnt  # mean yc e^{iωt}: YC + iYS
        np.multiply(z, z, out=z)
        e2 = np.add.reduceat(z, st, axis=1) / cnt  # mean e^{2iωt}: C2 + iS2
        out[s0:s1] = _power(e1, ye, e2, yc, st, cnt).T
    out[np.diff(np.append(starts, n)) < 3] = np.nan
    return out


def _power(e1: np.ndarray, ye: np.ndarray, e2: np.ndarray, yc: np.ndarray, st: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """astropy's floating-mean formula from the three mean phasor sums (frequencies x segments)."""
    c, s = e1.real, e1.imag
    c2 = e2.real - (c * c - s * s)
    s2 = e2.imag - 2 * s * c
    two_tau = np.arctan2(s2, c2)  # 2ωτ
    cos_t, sin_t = np.cos(0.5 * two_tau), np.sin(0.5 * two_tau)
    cos_2t, sin_2t = np.cos(two_tau), np.sin(two_tau)
    y_mean = np.add.reduceat(yc, st) / cnt  # ~0: kept as astropy keeps it
    c_tau = c * cos_t + s * sin_t
    s_tau = s * cos_t - c * sin_t
    yc_tau = ye.real * cos_t + ye.imag * sin_t - y_mean * c_tau
    ys_tau = ye.imag * cos_t - ye.real * sin_t - y_mean * s_tau
    cc_tau = 0.5 * (1 + e2.real * cos_2t + e2.imag * sin_2t) - c_tau * c_tau
    ss_tau = 0.5 * (1 - e2.real * cos_2t - e2.imag * sin_2t) - s_tau * s_tau
    with np.errstate(invalid="ignore", divide="ignore"):
        p = yc_tau * yc_tau / cc_tau + ys_tau * ys_tau / ss_tau
    return p * 0.5 * cnt


def band_power(power: np.ndarray, f0_hz: np.ndarray | float, df_hz: np.ndarray | float, band: tuple[float, float]) -> np.ndarray:
    """Trapezoid integral of ``power`` (segments x grid) over the grid points ``lo <= f < hi``
    (NeuroKit2's convention). NaN where no power falls in the band."""
    nseg, n_freq = power.shape
    f0 = np.broadcast_to(np.asarray(f0_hz, np.float64), (nseg,))[:, None]
    df = np.broadcast_to(np.asarray(df_hz, np.float64), (nseg,))[:, None]
    f = f0 + df * np.arange(n_freq)
    inside = (f >= band[0]) & (f < band[1])
    pair = inside[:, 1:] & inside[:, :-1]
    area = np.where(pair, 0.5 * (power[:, 1:] + power[:, :-1]), 0.0).sum(axis=1) * df[:, 0]
    with np.errstate(invalid="ignore"):
        return np.where(area > 0, area, np.nan)


def default_grid(window_s: float) -> tuple[float, float, int]:
    """(f0_hz, df_hz, n_freq) covering LF and HF for windows of ``window_s``."""
    df = 1.0 / (OVERSAMPLE * window_s)
    n_freq = int(np.ceil((HF_HZ[1] - LF_HZ[0]) / df)) + 1
    return LF_HZ[0], df, n_freq


def hrv_frequency(t_s: np.ndarray, rr_ms: np.ndarray, starts: np.ndarray, window_s: float) -> dict[str, np.ndarray]:
    """``lf_ms2``, ``hf_ms2``, ``lf_hf`` per segment of kept beats (rows sorted by segment,
    time order inside; ``starts`` the first row of each), on the default grid."""
    rr_ms = np.asarray(rr_ms, np.float64)
    starts = np.asarray(starts, np.int64)
    f0, df, n_freq = default_grid(window_s)
    lengths = np.diff(np.append(starts, len(rr_ms)))
    ok = lengths >= MIN_BEATS
    p = np.full((len(starts), n_freq), np.nan)
    if ok.any():
        keep = np.repeat(ok, lengths)
        sub_starts = np.cumsum(np.append(0, lengths[ok]))[:-1]
        p[ok] = lomb_scargle(np.asarray(t_s)[keep], rr_ms[keep], sub_starts, f0, df, n_freq)
    sums = np.add.reduceat(rr_ms, starts) if len(starts) else np.zeros(0)
    scale = 2.0 * (sums / np.maximum(lengths, 1)) / 1000.0  # one-sided PSD: 2 · mean RR (s)
    lf = band_power(p, f0, df, LF_HZ) * scale
    hf = band_power(p, f0, df, HF_HZ) * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"lf_ms2": lf, "hf_ms2": hf, "lf_hf": lf / hf}
