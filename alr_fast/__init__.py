"""alr-fast: person re-identification with Adaptive L2 Regularization (Ni, Fang, Huttunen, ICPR 2020).

Subpackages installed from the repository's top-level folders: ``alr_fast.pipelines`` (sampler,
augmentation, loaders), ``alr_fast.kernels`` (distance, ranking, re-ranking), ``alr_fast.bench``
(benchmarks) and ``alr_fast.configs`` (YAML recipes).
"""

__version__ = "0.1.0"
