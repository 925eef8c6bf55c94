"""Data of the supervised continual-learning benchmarks: MNIST (Online Permuted MNIST) and
Slowly-Changing Regression."""

from ppo_cbp.datasets.mnist import (
    MNIST_FILES,
    MNIST_MD5,
    MNIST_MIRRORS,
    MNIST_N_PIXELS,
    default_data_dir,
    download_mnist,
    example_indices,
    fetch_url,
    file_md5,
    load_mnist,
    permuted_mnist_task,
    read_idx,
    task_permutation,
    task_rng,
    verify_mnist_files,
)
from ppo_cbp.datasets.scr import SlowlyChangingRegression, SlowlyChangingRegressionBatch

__all__ = [
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "MNIST_N_PIXELS",
    "SlowlyChangingRegression",
    "SlowlyChangingRegressionBatch",
    "default_data_dir",
    "download_mnist",
    "example_indices",
    "fetch_url",
    "file_md5",
    "load_mnist",
    "permuted_mnist_task",
    "read_idx",
    "task_permutation",
    "task_rng",
    "verify_mnist_files",
]
