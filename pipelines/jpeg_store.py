"""Encoded JPEG bytes held in host memory, checked once when loaded.

Verification decodes every file with torchvision and also requires the SOI marker (FF D8) at the
start and the EOI marker (FF D9) at the end (trailing NUL padding allowed), which catches files
cut short. Damage inside the entropy-coded data that libjpeg only warns about (it prints
"Corrupt JPEG data" and still returns pixels) is not detectable this way and passes.
"""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .augment import decode_rgb


class CorruptImageError(ValueError):
    """Raised when image files fail verification; the message lists each file and why."""


@dataclass
class JpegStore:
    """paths[i] and its encoded bytes data[i]."""

    paths: list[str]
    data: list[bytes]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.data):
            raise ValueError(f"{len(self.paths)} paths but {len(self.data)} byte strings")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        return sum(len(d) for d in self.data)


def find_jpeg_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete, decodable JPEG, or None when it is."""
    if not data.startswith(b"\xff\xd8"):
        return "not a JPEG: no SOI marker (FF D8) at the start"
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "truncated: no EOI marker (FF D9) at the end"
    try:
        decode_rgb(data)
    except RuntimeError as err:
        # drop torchvision's "decode_jpeg, <source file>:<line>, " prefix
        return "decode failed: " + re.sub(r"^decode_jpeg, \S+:\d+, ", "", str(err).splitlines()[0])
    return None


def _read(path: str, verify: bool) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, read error, verification problem) of one file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return None, f"{type(err).__name__}: {err.strerror or err}", None
    return data, None, find_jpeg_problem(data) if verify else None


def _format(problems: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {path}: {why}" for path, why in problems)


def load_jpeg_store(
    paths: list[str],
    *,
    verify: bool = True,
    skip_corrupt: bool = False,
    num_threads: int | None = None,
    progress: bool = False,
) -> tuple[JpegStore, np.ndarray]:
    """Read every file into memory, optionally decoding each one to verify it.

    Returns the store and ``kept``, int64 indices into ``paths`` of the files it holds (all of
    them unless ``skip_corrupt`` dropped some). Unreadable files always raise ``OSError``; files
    that fail verification raise ``CorruptImageError`` naming all of them, or with
    ``skip_corrupt`` are dropped with a warning that names them.
    """
    paths = [os.fspath(p) for p in paths]
    workers = num_threads or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(_read, paths, [verify] * len(paths)),
                total=len(paths),
                desc="reading JPEGs",
                disable=not progress,
            )
        )
    unreadable = [(p, r[1]) for p, r in zip(paths, results) if r[1] is not None]
    if unreadable:
        raise OSError(f"cannot read {len(unreadable)} of {len(paths)} image files:\n{_format(unreadable)}")
    corrupt = [(p, r[2]) for p, r in zip(paths, results) if r[2] is not None]
    if corrupt and not skip_corrupt:
        raise CorruptImageError(f"{len(corrupt)} of {len(paths)} image files are corrupt:\n{_format(corrupt)}")
    if corrupt:
        warnings.warn(f"skipping {len(corrupt)} of {len(paths)} corrupt image files:\n{_format(corrupt)}", stacklevel=2)
    kept = np.array([i for i, r in enumerate(results) if r[2] is None], dtype=np.int64)
    store = JpegStore([paths[i] for i in kept], [results[i][0] for i in kept])
    return store, kept
