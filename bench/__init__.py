"""The benchmark suite of momentum-service: ``python -m bench`` (see bench/README.md).

``bench/kernel.py`` is a separate micro-benchmark of the momentum kernel alone.
"""
