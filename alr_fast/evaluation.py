"""Feature extraction and the evaluation protocol of docs/METHOD.md §8.

Extraction (``extract_features``) runs the embedding forward over an evaluation loader without
a host synchronisation per batch: labels and camera ids stay on the host (the loaders yield
them from host arrays), each batch and its horizontal flip go through the network as one batch
of 2B, features are written into one preallocated device tensor, and on a GPU the forward is
captured once in a CUDA graph (fixed shape; the last partial batch is padded and the padding
dropped). An eager path does the same without the graph; it is what a CPU runs.

``eval.precision`` is the extraction's arithmetic: fp32 by default, as the seed extracts (on a
GPU with TF32 convolutions off), bf16 / fp16 autocast opt-in. Features stay on the model's
device; the distance, ranking and re-ranking calls go through ``alr_fast.kernels``, which picks
the implementation for the arrays it is given: on a CPU the float32 BLAS path and the sort-free
ranking unless ``eval.exact`` asks for the float64 reference.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from . import kernels

REPORTED_RANKS = (1, 5, 10, 20)
EVAL_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BATCH_SIZE = 64  # the seed's test batch; a CPU gains nothing from larger ones
MAX_AUTO_BATCH = 256  # images per batch (2 x that per forward with flip): a GPU's GEMMs are full by then


@dataclass
class FeatureSet:
    """Inference features [N, D] (on the device they were computed on) with pids and camids [N]."""

    features: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray


def _check_eval_precision(precision: str) -> None:
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"eval precision must be one of {', '.join(EVAL_PRECISIONS)}; got {precision!r}")


def eval_input_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype evaluation loaders hand images over in: the autocast dtype of ``eval.precision``
    on a GPU (no cast before the first convolution), float32 otherwise."""
    _check_eval_precision(precision)
    dtype = EVAL_PRECISIONS[precision]
    return dtype if dtype is not None and device.type == "cuda" else torch.float32


def auto_batch_size(requested: int, device: torch.device, height: int, width: int, dtype: torch.dtype) -> int:
    """``eval.batch_size``, or for 0 (auto): 64 on a CPU; on a GPU the largest power of two up to
    ``MAX_AUTO_BATCH`` whose forward (2B images with flip) takes at most a tenth of the free memory.

    The estimate per image is four tensors of the largest activation (256 channels at a quarter of
    the input resolution, ResNet-50's layer1 output), ~6 MB at 384x128 in bf16.
    """
    if requested > 0:
        return requested
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)  # one query at setup, not per batch
    per_image = 4 * 256 * (height // 4) * (width // 4) * torch.empty((), dtype=dtype).element_size()
    batch = CPU_BATCH_SIZE
    while batch * 2 <= MAX_AUTO_BATCH and 2 * (batch * 2) * per_image <= free // 10:
        batch *= 2
    return batch


@contextlib.contextmanager
def strict_fp32(device: torch.device):
    """fp32 really is fp32 on a GPU: cuDNN and cuBLAS may not round inputs to TF32 (torch's
    cuDNN default allows it). Process-wide flags, restored on exit."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def eval_autocast(device: torch.device, precision: str):
    """The arithmetic of ``eval.precision``: autocast for bf16/fp16 (without the weight-cast
    cache, which CUDA-graph capture must not keep), strict fp32 otherwise."""
    dtype = EVAL_PRECISIONS[precision]
    if dtype is None:
        return strict_fp32(device)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


class _EagerEmbed:
    """features [n, D] float32 of images [n, 3, H, W]: the image and its flip as one batch of 2n."""

    def __init__(self, model: torch.nn.Module, flip: bool, autocast: Callable) -> None:
        self.model, self.flip, self.autocast = model, flip, autocast

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        with self.autocast():
            if not self.flip:
                return self.model.embed(images, flip=False).float()
            f = self.model.embed(torch.cat([images, images.flip(3)]), flip=False).float()
        return (f[:n] + f[n:]) / 2


class _CapturedEmbed:
    """``_EagerEmbed`` of a fixed batch of ``batch`` images captured in one CUDA graph.

    Per batch: one copy into the static input, one replay; a smaller (last) batch fills the first
    rows and the rows after it are computed on stale data and dropped by the caller. The graph's
    memory pool is freed with this object (one evaluation holds it, training does not).
    """

    def __init__(self, model: torch.nn.Module, flip: bool, autocast: Callable, sample: torch.Tensor) -> None:
        self.batch = sample.shape[0]
        self.static_in = sample.clone()  # same shape, dtype and memory format (channels_last on a GPU)
        eager = _EagerEmbed(model, flip, autocast)
        side = torch.cuda.Stream(sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(side):  # warm-up (cuDNN algorithm choice, lazy inits) off the capture
            for _ in range(2):
                eager(self.static_in)
        torch.cuda.current_stream(sample.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = eager(self.static_in)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if n > self.batch:
            raise RuntimeError(f"a batch of {n} images after batches of {self.batch}: the captured "
                               f"embedding has a fixed batch; use eval.capture=false for such a loader")
        self.static_in[:n].copy_(images)
        self.graph.replay()
        return self.static_out[:n]


class FeatureExtractor:
    """The embedding of one evaluation: eager, or captured in a CUDA graph on the first batch.

    Build one per evaluation and use it for the query and the gallery (same batch shape, one
    capture); drop it afterwards, which frees the graph's memory.
    """

    def __init__(self, model: torch.nn.Module, *, flip: bool = True, precision: str = "fp32",
                 capture: bool | None = None) -> None:
        _check_eval_precision(precision)
        self.model, self.flip, self.precision, self.capture = model, flip, precision, capture
        self._captured: _CapturedEmbed | None = None

    def _embed(self, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        device = images.device
        autocast = lambda: eval_autocast(device, self.precision)  # noqa: E731
        capture = device.type == "cuda" if self.capture is None else self.capture
        if not capture:
            return _EagerEmbed(self.model, self.flip, autocast)
        if device.type != "cuda":
            raise ValueError(f"capture=True needs images on a CUDA device; got {device}")
        if self._captured is None or self._captured.static_in.shape[1:] != images.shape[1:] \
                or self._captured.static_in.dtype != images.dtype:
            self._captured = _CapturedEmbed(self.model, self.flip, autocast, images)
        return self._captured

    @torch.no_grad()
    def __call__(self, loader: Iterable, *, progress: bool = False, desc: str = "features") -> FeatureSet:
        """Features of every image of ``loader`` ((images, pids, camids) batches) in inference mode.

        Nothing here waits for the device: pids/camids are collected as the loader gives them
        (host tensors from the project's loaders; device ones are copied once at the end), the
        features go into one tensor allocated at the first batch (``loader.num_images`` rows).
        """
        was_training = self.model.training
        self.model.eval()
        total = getattr(loader, "num_images", None)
        feats: torch.Tensor | None = None
        parts: list[torch.Tensor] = []
        pids, camids, row = [], [], 0
        try:
            embed = None
            for images, p, c in tqdm(loader, desc=desc, disable=not progress, leave=False):
                if embed is None:
                    embed = self._embed(images)
                n = images.shape[0]
                f = embed(images)
                if total is None:
                    parts.append(f.clone() if isinstance(embed, _CapturedEmbed) else f)
                else:
                    if row + n > total:
                        raise RuntimeError(f"{desc}: the loader yielded {row + n} images or more but announced "
                                           f"num_images={total}")
                    if feats is None:
                        feats = torch.empty((total, f.shape[1]), dtype=torch.float32, device=f.device)
                    feats[row:row + n] = f
                pids.append(torch.as_tensor(p))
                camids.append(torch.as_tensor(c))
                row += n
        finally:
            self.model.train(was_training)
        if row == 0:
            raise ValueError(f"{desc}: the loader yielded no images")
        if total is not None and row != total:
            raise RuntimeError(f"{desc}: the loader yielded {row} images but announced num_images={total}")
        features = feats if feats is not None else torch.cat(parts)
        # one copy for the whole set when a loader gave device labels (none of the project's do)
        return FeatureSet(features, torch.cat(pids).cpu().numpy(), torch.cat(camids).cpu().numpy())


def extract_features(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    flip: bool = True,
    precision: str = "fp32",
    capture: bool | None = None,
    progress: bool = False,
    desc: str = "features",
) -> FeatureSet:
    """Flip-averaged ``model.embed`` features of ``loader``; see ``FeatureExtractor``.

    ``capture``: None captures the forward in a CUDA graph on a GPU and runs eagerly on a CPU.
    """
    return FeatureExtractor(model, flip=flip, precision=precision, capture=capture)(loader, progress=progress, desc=desc)


def ranking_metrics(cmc: np.ndarray, mAP: float, prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}mAP": float(mAP)}
    for r in REPORTED_RANKS:
        if r <= len(cmc):
            out[f"{prefix}rank{r}"] = float(cmc[r - 1])
    return out


class _StageTimer:
    """Seconds per stage into ``times`` (when given): each stage ends with a deliberate device
    synchronisation, so that the figures mean something; nothing is timed otherwise."""

    def __init__(self, times: dict | None, device: torch.device) -> None:
        self.times, self.device = times, device

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.times is None:
            yield
            return
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def distance_precisions(exact: bool, on_host: bool, rerank_gemm: str) -> tuple[str | None, str | None, str | None]:
    """(q-g distance precision, re-ranking q-q/g-g precision, ranking method) of an evaluation.

    exact: the float64 reference everywhere (host: sklearn's float64 and the sorted ranking).
    Otherwise: a float32 GEMM for the q-g matrix CMC/mAP read, ``rerank_gemm`` (float32, tf32 or
    bf16) for the matrices that only feed re-ranking, and the sort-free ranking on a CPU.
    """
    if exact:
        return "float64", "float64", None
    return "float32", rerank_gemm, ("count" if on_host else None)


def evaluate_features(
    query: FeatureSet,
    gallery: FeatureSet,
    *,
    metric: str = "cosine",
    re_ranking: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    memory_budget_bytes: int | None = None,
    exact: bool = False,
    rerank_gemm: str = "float32",
    stage_times: dict | None = None,
) -> dict:
    """mAP and CMC of ``query`` against ``gallery``; with ``re_ranking`` also the k-reciprocal ones
    (keys prefixed ``rr_``). ``cmc`` (and ``rr_cmc``) hold the whole curve up to ``max_rank``.

    ``exact`` / ``rerank_gemm``: see ``distance_precisions``. ``stage_times``: a dict that receives
    the seconds of "distance", "ranking" and "re_ranking" (device-synchronised, for benchmarks).
    """
    budget = dict(memory_budget_bytes=memory_budget_bytes)
    device = query.features.device
    on_host = device.type != "cuda"
    qg_precision, rr_precision, method = distance_precisions(exact, on_host, rerank_gemm)
    timer = _StageTimer(stage_times, device)
    # CPU, re-ranking, float32 everywhere: one symmetric matrix of all Q + G items holds q-g, q-q
    # and g-g, and re-ranking squares it in place (host.rerank_joint: the reference's result bit
    # for bit on that matrix, without a separate g-g matrix and the reference's transposed copy).
    # Its "distance" stage then includes the q-q and g-g blocks.
    joint = None
    with timer("distance"):
        if re_ranking and on_host and not exact and rr_precision == "float32":
            joint = kernels.host.joint_distmat(kernels._to_numpy(query.features), kernels._to_numpy(gallery.features),
                                               metric, "float32")
            num_q = len(query.pids)
            qg = joint[:num_q, num_q:].copy()  # the joint matrix is squared in place below
        else:
            qg = kernels.compute_distmat(query.features, gallery.features, metric=metric, precision=qg_precision,
                                         **budget)
    with timer("ranking"):
        cmc, mAP = kernels.evaluate_ranking(qg, query.pids, gallery.pids, query.camids, gallery.camids,
                                            max_rank=max_rank, method=method, **budget)
    out: dict = ranking_metrics(cmc, mAP)
    out["cmc"] = [float(v) for v in cmc]
    out["num_query"], out["num_gallery"] = int(len(query.pids)), int(len(gallery.pids))
    if re_ranking:
        with timer("re_ranking"):
            if joint is not None:
                rr = kernels.host.rerank_joint(joint, len(query.pids), k1, k2, lambda_value)
                del joint
            else:
                qq = kernels.compute_distmat(query.features, query.features, metric=metric, precision=rr_precision,
                                             **budget)
                gg = kernels.compute_distmat(gallery.features, gallery.features, metric=metric, precision=rr_precision,
                                             **budget)
                rr = kernels.rerank_k_reciprocal(qg, qq, gg, k1=k1, k2=k2, lambda_value=lambda_value, **budget)
                del qq, gg
            cmc_rr, mAP_rr = kernels.evaluate_ranking(
                rr, query.pids, gallery.pids, query.camids, gallery.camids, max_rank=max_rank, method=method, **budget
            )
        out.update(ranking_metrics(cmc_rr, mAP_rr, prefix="rr_"))
        out["rr_cmc"] = [float(v) for v in cmc_rr]
        del rr
    del qg
    _release_cupy_pool(query.features)
    return out


def _release_cupy_pool(features: torch.Tensor) -> None:
    """CuPy keeps freed blocks in its own pool, out of torch's reach: hand them back after an
    evaluation so training does not run short of memory."""
    if features.is_cuda:
        try:
            import cupy
        except ImportError:
            return
        cupy.get_default_memory_pool().free_all_blocks()


def format_metrics(m: dict) -> str:
    parts = [f"mAP {m['mAP']:.4f}"] + [f"rank-{r} {m[f'rank{r}']:.4f}" for r in REPORTED_RANKS if f"rank{r}" in m]
    text = ", ".join(parts)
    if "rr_mAP" in m:
        text += f" | re-ranked mAP {m['rr_mAP']:.4f}, rank-1 {m['rr_rank1']:.4f}"
    return text
