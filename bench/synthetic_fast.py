"""A fast, bench-only generator of synthetic re-ID JPEGs at a dataset's real counts.

``alr_fast.synthetic.make_synthetic`` renders every person (clothes, patterns, cameras, blur) and
is the data of the demo and the tests; at Market-1501's 32,217 or MSMT17's 126,441 images it
would take minutes. The benchmarks only need images that decode like real ones (JPEGs of the
datasets' typical size, 128x64) and identities that a network can tell apart, so here each
identity is one cheap base image (two clothing colours and a stripe pattern), each camera a
gain, each image that base shifted by a few pixels plus noise, encoded with torchvision in
threads. Deterministic from ``seed``.
"""
from __future__ import annotations

import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import encode_jpeg

from alr_fast.pipelines.jpeg_store import JpegStore

# the published counts (the datasets' own papers and the seed's asserts): train images / ids, query, gallery (junk dropped), cameras
REAL_COUNTS = {
    "market1501": dict(train=12936, train_ids=751, query=3368, gallery=15913, test_ids=750, cameras=6),
    "dukemtmc_reid": dict(train=16522, train_ids=702, query=2228, gallery=17661, test_ids=1110, cameras=8),
    "msmt17": dict(train=32621, train_ids=1041, query=11659, gallery=82161, test_ids=3060, cameras=15),
}
SOURCE_SIZE = (128, 64)  # height, width of the written JPEGs: Market-1501's crops


def scaled_counts(dataset: str, scale: float) -> dict[str, int]:
    """The real counts of ``dataset`` times ``scale`` (at least a handful of each)."""
    real = REAL_COUNTS[dataset]
    out = {k: max(4 if "ids" in k else 8, int(round(v * scale))) for k, v in real.items() if k != "cameras"}
    out["cameras"] = real["cameras"]
    # the seed's P = 16 identities per batch where the images allow, K = 4 images per identity at least
    out["train_ids"] = min(max(out["train_ids"], 16), out["train"] // 4)
    out["test_ids"] = min(out["test_ids"], out["query"])
    return out


def _bases(num_ids: int, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [num_ids, H, W, 3]: two clothing colours split at a random waist, stripes of a random period."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((num_ids, height, width, 3), dtype=np.uint8)
    for i in range(num_ids):
        top, bottom = rng.integers(20, 236, (2, 3))
        waist = int(rng.integers(height // 3, 2 * height // 3))
        period, vertical = int(rng.integers(6, 24)), bool(rng.integers(2))
        stripes = (((xx if vertical else yy) // period) % 2 == 0)[..., None]
        img = np.where((yy < waist)[..., None], top, bottom).astype(np.int16)
        img = img + np.where(stripes, 25, -25)
        out[i] = np.clip(img, 0, 255)
    return out


def render_jpegs(pids: np.ndarray, cams: np.ndarray, *, seed: int = 0, quality: int = 90,
                 threads: int | None = None) -> list[bytes]:
    """One JPEG (SOURCE_SIZE) per (pid, camera) pair of the arrays; pids index identities 0..max."""
    height, width = SOURCE_SIZE
    rng = np.random.default_rng(seed)
    bases = _bases(int(pids.max()) + 1, rng, height, width)
    gains = rng.uniform(0.6, 1.3, (int(cams.max()) + 1, 3)).astype(np.float32)
    shifts = rng.integers(-6, 7, (len(pids), 2))
    noise_seeds = rng.integers(0, 2**31, len(pids))

    def one(i: int) -> bytes:
        noise = np.random.default_rng(int(noise_seeds[i])).integers(-12, 13, (height, width, 3), dtype=np.int16)
        img = np.roll(bases[pids[i]], tuple(shifts[i]), axis=(0, 1)).astype(np.float32) * gains[cams[i]]
        pixels = np.clip(img + noise, 0, 255).astype(np.uint8)
        return encode_jpeg(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), quality=quality).numpy().tobytes()

    with ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, range(len(pids))))


def eval_split(num_query: int, num_gallery: int, num_ids: int, num_cams: int, *, seed: int = 0):
    """(query store, q_pids, q_cams, gallery store, g_pids, g_cams) held in memory.

    Query pids are 1..num_ids; the gallery holds each query identity under other cameras too,
    and ~10% pid-0 distractors, as Market-1501.
    """
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, num_ids + 1, num_query)
    q_cams = rng.integers(1, num_cams + 1, num_query)
    g_pids = rng.integers(1, num_ids + 1, num_gallery)
    g_pids[rng.random(num_gallery) < 0.1] = 0
    g_cams = rng.integers(1, num_cams + 1, num_gallery)
    jpegs = render_jpegs(np.concatenate([q_pids, g_pids]), np.concatenate([q_cams, g_cams]), seed=seed + 1)
    q_store = JpegStore([f"query/{i}.jpg" for i in range(num_query)], jpegs[:num_query])
    g_store = JpegStore([f"gallery/{i}.jpg" for i in range(num_gallery)], jpegs[num_query:])
    return q_store, q_pids, q_cams, g_store, g_pids, g_cams


def write_dataset(root: str | os.PathLike, dataset: str, counts: dict[str, int], *, seed: int = 0) -> pathlib.Path:
    """Write ``counts`` (see ``scaled_counts``) in the native layout of ``dataset`` under ``root``.

    market1501 and dukemtmc_reid: the three image folders with the published file-name schemes;
    msmt17: the V2 image folders and the four list files. Returns the dataset folder.
    """
    rng = np.random.default_rng(seed)
    cams = counts["cameras"]
    train_pids = np.repeat(np.arange(1, counts["train_ids"] + 1), -(-counts["train"] // counts["train_ids"]))
    train_pids = np.sort(rng.permutation(train_pids)[:counts["train"]])
    first_test = counts["train_ids"] + 1 if dataset != "msmt17" else 0
    q_pids = first_test + rng.integers(1, counts["test_ids"] + 1, counts["query"])
    g_pids = first_test + rng.integers(1, counts["test_ids"] + 1, counts["gallery"])
    if dataset == "market1501":
        g_pids[rng.random(len(g_pids)) < 0.1] = 0
    splits = {"train": train_pids, "query": q_pids, "gallery": g_pids}
    split_cams = {k: rng.integers(1, cams + 1, len(v)) for k, v in splits.items()}
    all_pids = np.concatenate(list(splits.values()))
    jpegs = render_jpegs(all_pids, np.concatenate(list(split_cams.values())) - 1, seed=seed + 1)
    folder = pathlib.Path(root) / {"market1501": "Market-1501-v15.09.15", "dukemtmc_reid": "DukeMTMC-reID",
                                   "msmt17": "MSMT17_V2"}[dataset]
    lists: dict[str, list[str]] = {}
    k = 0
    for split, pids in splits.items():
        for j, (pid, cam) in enumerate(zip(pids.tolist(), split_cams[split].tolist())):
            if dataset == "msmt17":
                sub = "mask_train_v2" if split == "train" else "mask_test_v2"
                rel = f"{pid:04d}/{pid:04d}_{j:03d}_{cam:02d}_0303morning_{j:04d}_0.jpg"
                lists.setdefault(split, []).append(f"{rel} {pid}")
            else:
                sub = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}[split]
                rel = f"{pid:04d}_c{cam}s1_{j:06d}_00.jpg" if dataset == "market1501" else f"{pid:04d}_c{cam}_f{j:07d}.jpg"
            path = folder / sub / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpegs[k])
            k += 1
    if dataset == "msmt17":
        train = lists["train"]
        (folder / "list_train.txt").write_text("\n".join(train[1:]) + "\n")
        (folder / "list_val.txt").write_text(train[0] + "\n")  # the reader wants a non-empty val list
        (folder / "list_query.txt").write_text("\n".join(lists["query"]) + "\n")
        (folder / "list_gallery.txt").write_text("\n".join(lists["gallery"]) + "\n")
    return folder
