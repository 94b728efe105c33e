"""Helpers shared by the loader tests (torch, DALI, decode-once cache)."""
import io

import numpy as np
import torch
from PIL import Image


def jpeg_bytes(rng: np.random.Generator, h: int, w: int, mode: str = "RGB") -> bytes:
    """A smooth random h x w JPEG (quality 92) in PIL ``mode``."""
    coarse = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def write_files(folder, blobs: list[bytes], suffix=".jpg") -> list[str]:
    paths = []
    for i, blob in enumerate(blobs):
        path = folder / f"img_{i:03d}{suffix}"
        path.write_bytes(blob)
        paths.append(str(path))
    return paths


def run_epochs(loader, n):
    """n epochs of (images, pids, camids) batches, cloned so later epochs cannot alias them."""
    return [[tuple(t.clone() for t in batch) for batch in loader] for _ in range(n)]


def assert_same_epochs(a, b):
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b)
        for batch_a, batch_b in zip(epoch_a, epoch_b):
            for x, y in zip(batch_a, batch_b):
                assert x.dtype == y.dtype and torch.equal(x, y)
