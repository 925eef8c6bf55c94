"""Data of the supervised continual-learning benchmarks, one module per source: ``mnist``
(Online Permuted MNIST), ``scr`` (Slowly-Changing Regression), ``imagenet32`` (Continual
ImageNet) and ``cifar100`` (class-incremental CIFAR-100)."""
