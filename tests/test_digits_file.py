"""The digits table is read from scikit-learn's bundled file without importing scikit-learn,
and is exactly what ``sklearn.datasets.load_digits`` returns."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from traci_ml.core.data.tables import digits


def test_digits_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    x, y, columns, classes = digits()
    bunch = load_digits()
    np.testing.assert_array_equal(x, bunch.data.astype(np.float32))
    np.testing.assert_array_equal(y, bunch.target)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (1797, 64)
    assert list(columns) == bunch.feature_names and classes == tuple("0123456789")


def test_reading_digits_imports_no_scikit_learn():
    code = (
        "import sys; from traci_ml.core.data.tables import digits; digits(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert out.stdout.strip() == "[]"
