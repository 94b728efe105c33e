"""``data.loader=auto``: the decode-once cache when it fits the budget, else DALI, else torch.

Pure selection logic, so it runs without a GPU and without DALI (``_dali_available`` is patched).
"""
import logging

import pytest
import torch

from alr_fast import data
from alr_fast.pipelines.gpu_cache import cache_bytes

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
MARKET = (12936, 384, 128)  # 1.9 GB decoded
GIB = 2**30


@pytest.fixture(params=[True, False], ids=["dali", "no-dali"])
def dali_installed(request, monkeypatch):
    monkeypatch.setattr(data, "_dali_available", lambda: request.param)
    return request.param


def test_auto_picks_cache_when_it_fits_the_budget(dali_installed):
    fits = cache_bytes(*MARKET) / GIB
    assert data.resolve_loader_kind("auto", CUDA, *MARKET, budget_gb=fits) == "cache"
    assert data.resolve_loader_kind("auto", CUDA, *MARKET, budget_gb=6.0) == "cache"
    assert data.resolve_loader_kind("auto", CPU, *MARKET, budget_gb=6.0) == "torch"  # no device cache on a CPU


def test_auto_falls_back_to_per_step_decoding(dali_installed, caplog):
    too_small = cache_bytes(*MARKET) / GIB * 0.99
    with caplog.at_level(logging.WARNING, logger="alr_fast"):
        kind = data.resolve_loader_kind("auto", CUDA, *MARKET, budget_gb=too_small)
    assert kind == ("dali" if dali_installed else "torch")
    assert ("nvidia-dali" in caplog.text) != dali_installed  # says what to install when it falls back to torch
    assert data.resolve_loader_kind("auto", CUDA, *MARKET, budget_gb=0.0) == kind


def test_explicit_choice_is_kept(dali_installed):
    for kind in ("torch", "cache"):
        assert data.resolve_loader_kind(kind, CUDA, *MARKET, budget_gb=0.0) == kind
    if dali_installed:
        assert data.resolve_loader_kind("dali", CPU, *MARKET, budget_gb=100.0) == "dali"  # DALI's CPU operators
    else:
        with pytest.raises(ImportError, match="pip install nvidia-dali"):
            data.resolve_loader_kind("dali", CUDA, *MARKET, budget_gb=100.0)
