"""divdistill_jax: distilling deep ensembles with diversity, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="divdistill_jax",
    version="0.1.0",
    description=("Diversity Matters When Learning From Ensembles (NeurIPS "
                 "2021) in JAX/Flax: DE teachers, ODS/ConfODS distillation "
                 "into BatchEnsemble students."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["divdistill_jax", "divdistill_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.0,<0.13",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.12.0,<0.13",
        "chex>=0.1.90,<0.2",
        "ml_collections>=1.0,<2",
        "numpy>=2.0,<3",
        "absl-py>=2.0",
        "tensorboardX>=2.6,<3",
        "tqdm>=4.60",
        "matplotlib>=3.8",
        "pillow>=10",
    ],
    extras_require={
        "tfds": ["tensorflow-datasets>=4.9.6,<5", "array_record>=0.5"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "tensorflow-datasets>=4.9.6,<5",
            "array_record>=0.5",
            "nbformat>=5.9",
            "ipython>=8",
            "ruff>=0.6",
        ],
        "gpu": ["jax[cuda12]>=0.10.0,<0.13"],
        "tpu": ["jax[tpu]>=0.10.0,<0.13"],
    },
    entry_points={"console_scripts": ["divdistill=divdistill_jax.main:run"]},
)
