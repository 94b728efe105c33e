"""alr-fast: a high-throughput person re-ID trainer with Adaptive L2 Regularization.

The folders ``pipelines/``, ``kernels/`` and ``bench/`` sit at the top level of the repository but
are installed inside the ``alr_fast`` namespace (``alr_fast.pipelines`` ...): their bare names are
taken on the package index by unrelated projects (see the README's Layout).
"""
from setuptools import setup

setup(
    name="alr-fast",
    version="0.1.0",
    description="Adaptive L2 Regularization for person re-identification: DALI, mixed precision, CuPy",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["alr_fast", "alr_fast.pipelines", "alr_fast.kernels", "alr_fast.bench", "alr_fast.configs"],
    package_dir={
        "alr_fast": "alr_fast",
        "alr_fast.pipelines": "pipelines",
        "alr_fast.kernels": "kernels",
        "alr_fast.bench": "bench",
        "alr_fast.configs": "configs",
    },
    package_data={"alr_fast.configs": ["*.yaml"], "alr_fast.kernels": ["*.cu"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "pillow>=9.0",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "scikit-learn>=1.2",
    ],
    extras_require={
        # DALI tests run in CPU mode without a GPU; h5py, tensorflow-cpu (the tf.keras proofs of the keras
        # style), onnx and onnxruntime (the export parity test) so that CI runs those tests instead of skipping
        "test": ["pytest>=7.0", "nvidia-dali-cuda130", "h5py", "tensorflow-cpu", "onnx", "onnxruntime"],
        "dali": ["nvidia-dali-cuda130"],
        "cupy": ["cupy-cuda13x"],
        "keras": ["h5py"],  # Keras .h5 weights (model.backbone_style=keras)
        "export": ["onnx", "onnxruntime"],  # alr-fast export (ONNX) and its parity test
    },
    entry_points={"console_scripts": ["alr-fast=alr_fast.cli:main"]},
)
