"""Argument checks shared by the evaluation kernels (NumPy reference and CuPy), and the one
finish of their ranking results.

The checks look only at ``.ndim``, ``.shape`` and ``.dtype`` so that they work on any array type
with NumPy-style metadata. Every failure is a ``ValueError`` that names the argument and shows
the offending shape and dtype.
"""
from __future__ import annotations

import warnings

import numbers

import numpy as np

FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def describe(x) -> str:
    """``"shape (10, 2048) float32"``, for error messages."""
    return f"shape {tuple(x.shape)} {np.dtype(x.dtype).name}"


def check_features(name: str, x, feature_dim: int | None = None, ref_name: str = "qf") -> None:
    """A feature matrix: 2-D, float16/32/64, at least one row and one column.

    With ``feature_dim`` the second dimension must equal it (the dimension of ``ref_name``).
    """
    ok = x.ndim == 2 and np.dtype(x.dtype) in FEATURE_DTYPES and x.shape[0] >= 1 and x.shape[1] >= 1
    if feature_dim is None:
        if not ok:
            raise ValueError(
                f"{name} must be a non-empty 2-D float array (float16, float32 or float64); "
                f"got {describe(x)}"
            )
    elif not ok or x.shape[1] != feature_dim:
        raise ValueError(
            f"{name} must be 2-D float array with the same feature dimension as {ref_name} "
            f"({feature_dim}); got {describe(x)}"
        )


def nonfinite_message(name: str, x) -> str:
    """The one-line error for NaN or infinite values in argument ``name``."""
    return f"{name} contains NaN or infinite values ({describe(x)})"


def check_finite(name: str, x) -> None:
    """ValueError naming ``name`` if the NumPy array ``x`` holds a NaN or an infinity."""
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(nonfinite_message(name, x))


def check_finite_device(xp, named: list[tuple[str, object]]) -> None:
    """``check_finite`` of several device arrays with one host read: one flag per array,
    reduced on the device, then copied at once (the call's single synchronisation for it)."""
    floats = [(n, x) for n, x in named if np.issubdtype(np.dtype(x.dtype), np.floating)]
    if not floats:
        return
    bad = xp.stack([~xp.isfinite(x).all() for _, x in floats])
    bad = bad if isinstance(bad, np.ndarray) else bad.get()
    for (name, x), hit in zip(floats, bad):
        if hit:
            raise ValueError(nonfinite_message(name, x))


def _is_real_numeric(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype != np.bool_ and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))


def check_matrix(name: str, x, shape: tuple[int, int] | None = None, shape_desc: str = "") -> None:
    """A real-valued 2-D matrix, non-empty, optionally of an exact shape."""
    if x.ndim != 2 or not _is_real_numeric(x.dtype) or 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty 2-D real-valued array; got {describe(x)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} {shape_desc}; got {describe(x)}")


def check_labels(name: str, x, length: int, length_desc: str) -> None:
    """A 1-D label vector (pids or camids) of the given length."""
    if x.ndim != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must be 1-D of length {length} ({length_desc}); got {describe(x)}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def check_unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
    return float(value)


def check_ranking_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank) -> int:
    """Shared checks of ``evaluate_ranking`` on both paths; returns the usable max_rank
    (the gallery size when it is smaller, with the torchreid warning)."""
    check_matrix("distmat", distmat)
    num_q, num_g = distmat.shape
    check_labels("q_pids", q_pids, num_q, f"distmat has {num_q} rows")
    check_labels("g_pids", g_pids, num_g, f"distmat has {num_g} columns")
    check_labels("q_camids", q_camids, num_q, f"distmat has {num_q} rows")
    check_labels("g_camids", g_camids, num_g, f"distmat has {num_g} columns")
    max_rank = check_positive_int("max_rank", max_rank)
    if num_g < max_rank:
        warnings.warn(
            f"number of gallery samples is quite small ({num_g}); CMC is computed up to rank "
            f"{num_g} instead of {max_rank}",
            stacklevel=4,  # the caller of the public alr_fast.kernels function
        )
        max_rank = num_g
    return max_rank


def cmc_and_map(first_rank_hist, ap_sum: float, num_q: int, max_rank: int) -> tuple[np.ndarray, float]:
    """CMC and mAP of ``evaluate_ranking`` from its counts, on both paths: ``first_rank_hist[0]``
    counts the queries without a valid match, ``first_rank_hist[r]`` those whose first match is at
    rank r (1-based); ``ap_sum`` sums the valid queries' average precisions."""
    num_valid = num_q - int(first_rank_hist[0])
    if num_valid == 0:
        raise ValueError(
            "no query has a valid match in the gallery (every query identity is absent from the "
            "gallery or only seen by the query's own camera)"
        )
    cmc = np.cumsum(first_rank_hist[1:max_rank + 1]) / num_valid
    return cmc.astype(np.float32), float(ap_sum) / num_valid


def check_distmat_inputs(qf, gf, metric: str, metrics: tuple[str, ...]):
    """(qf, gf, same) as NumPy arrays after the checks every host ``compute_distmat`` makes:
    feature shapes and dtypes, the metric, and finite values. ``same``: gf is qf (the x-x case)."""
    same = qf is gf
    qf = np.asarray(qf)
    gf = qf if same else np.asarray(gf)
    check_features("qf", qf)
    check_features("gf", gf, feature_dim=qf.shape[1], ref_name="qf")
    if metric not in metrics:
        raise ValueError(f"metric must be one of {', '.join(metrics)}; got {metric!r}")
    check_finite("qf", qf)
    if not same:  # the x-x case: that array was just scanned as qf
        check_finite("gf", gf)
    return qf, gf, same
