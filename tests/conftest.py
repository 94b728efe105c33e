import os

import pytest
import torch

# keep the 2-core CI machine responsive: tests use at most 2 threads
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _pristine_alr_fast_logger():
    """fit() and evaluate route the "alr_fast" logger to the stderr of their moment and stop its
    propagation; undo that after each test, so that later tests' caplog sees the records."""
    yield
    import logging

    logger = logging.getLogger("alr_fast")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The synthetic dataset of run_helpers.TINY, made once per session."""
    from run_helpers import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """A finished run of run_helpers.TINY (the reference trajectory), trained once per session.
    Tests must not change it: copy it first."""
    from run_helpers import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert train(run, tiny_data) == 0
    return run
