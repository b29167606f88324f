"""`make demo` (the README's first command) runs in the suite, on the embedded default: no servers configured.

Its printed prediction is checked against the guide's RandomForest trained here with the same data and seed,
so the demo cannot pass by printing whatever its replica answered."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

from tests.helpers import REPO


def _guide_predictions() -> np.ndarray:
    from sklearn.datasets import make_regression
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.model_selection import train_test_split

    X, y = make_regression(n_samples=1000, n_features=4, n_informative=2, noise=0.1, random_state=0)
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=0.2, random_state=0)
    model = RandomForestRegressor(n_estimators=20, max_depth=10, random_state=0).fit(X_train, y_train)
    return model.predict(X_test[:2])


def test_make_demo_serves_the_guides_model_from_the_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFETCH_", "AWS_"))}
    # The venv this suite runs in; its stamp counts as up to date (`make test` just built it), so make never
    # reinstalls from inside a test.
    venv = sys.prefix
    proc = subprocess.run(["make", "-C", str(REPO), "demo", f"VENV={venv}", "-o", f"{venv}/.installed"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    match = re.search(r"^prediction:\s+(\S+), (\S+)\s+\(model (\S+) version (\d+)\)", out, re.M)
    assert match, out[-2000:]
    printed = np.array([float(match.group(1)), float(match.group(2))])
    np.testing.assert_allclose(printed, _guide_predictions(), atol=1e-3)
    assert match.group(3) == "sk-learn-random-forest-reg-model" and match.group(4) == "1"
    # The second load was a cache hit, and the replica found the model in the node's cache.
    assert re.search(r"^warm load: .*cache hit", out, re.M) and "cache hit" in out.split("replica:", 1)[1]
