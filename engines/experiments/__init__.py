"""Experiments: measurements that informed the product but are not part of it.

Each module is a thin script over the product's public functions (``engines.*``), run as
``python -m engines.experiments.<name>``; its results are kept beside it in ``results/``. Nothing in
``edge/``, ``calibration/`` or the product chain of ``engines/`` imports from here (an import-linter
contract in pyproject.toml checks it).
"""
