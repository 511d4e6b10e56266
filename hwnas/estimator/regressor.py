"""The per-kernel-kind latency regressor: a non-negative linear baseline times a boosted correction.

    latency ≈ (w · work) · exp(f(shape))

`w · work` is a non-negative least-squares fit on the work features (fold steps, vector steps, bytes,
MACs, a constant): latency grows with them and a linear model extrapolates to sizes the samples did not
cover, which trees cannot. `f` is scikit-learn's histogram gradient boosting on the log of the remaining
ratio, fitted on every shape feature: it learns the cliffs (channel residues), the memory-bound regime
and whatever else makes a target deviate from "time ∝ work". scikit-learn's API: parameters in
`__init__`, learned state in trailing-underscore attributes, `fit` returns self.

After fitting, the trees are kept as plain arrays (`forest_`): prediction walks them with numpy, and
`to_arrays` / `from_arrays` store and restore a fitted regressor without pickle (an estimator file is
refitted from its measurements when the stored arrays came from another scikit-learn version).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.ensemble import HistGradientBoostingRegressor

_MIN_SAMPLES_FOR_BOOSTING = 24
_FLOOR = 1e-9  # latencies are positive; keeps logs finite
# The fits are small: OpenMP threads only spin against each other (and against a timing run on a
# 2-core machine); one thread is ~40x faster here.
_ONE_THREAD = {"limits": 1, "user_api": "openmp"}


@dataclass(frozen=True)
class Forest:
    """Every tree of a boosted model in flat arrays (global node indices), plus the constant term."""

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    is_leaf: np.ndarray
    value: np.ndarray
    roots: np.ndarray
    depth: int
    baseline: float

    @classmethod
    def from_sklearn(cls, model: HistGradientBoostingRegressor) -> Forest:
        nodes = [p.nodes for (p,) in model._predictors]
        offsets = np.cumsum([0] + [len(n) for n in nodes[:-1]]).astype(np.int64)
        flat = np.concatenate(nodes)
        shift = np.concatenate([np.full(len(n), o, dtype=np.int64) for n, o in zip(nodes, offsets)])
        if flat["is_categorical"].any():
            raise ValueError("categorical splits are not used by hwnas features")
        return cls(
            feature=flat["feature_idx"].astype(np.int64), threshold=flat["num_threshold"].astype(np.float64),
            left=flat["left"].astype(np.int64) + shift, right=flat["right"].astype(np.int64) + shift,
            is_leaf=flat["is_leaf"].astype(bool), value=flat["value"].astype(np.float64), roots=offsets,
            depth=int(flat["depth"].max()) if len(flat) else 0, baseline=float(np.ravel(model._baseline_prediction)[0]),
        )

    def predict(self, X: np.ndarray) -> np.ndarray:
        """What sklearn's predictor does (x <= threshold goes left), for all trees at once."""
        idx = np.broadcast_to(self.roots, (len(X), len(self.roots))).copy()
        rows = np.arange(len(X))[:, None]
        for _ in range(self.depth):
            go_left = X[rows, self.feature[idx]] <= self.threshold[idx]
            step = np.where(go_left, self.left[idx], self.right[idx])
            idx = np.where(self.is_leaf[idx], idx, step)
        return self.baseline + self.value[idx].sum(axis=1)


class KernelRegressor:
    """Fit on X = [work features | shape features]; the first `n_work` columns are the work features.

    Trees of 7 leaves (were 15): on the 3,000-sample cpu profile of 2026-12-05, 5-fold cross-validation by
    profiling network 0.149 -> 0.144 mean error per network, held-out models within ±10 % 61 -> 68 %
    (`estimator_accuracy.py --measured`); a few hundred samples per kind support no deeper trees."""

    def __init__(self, n_work: int, max_iter: int = 120, learning_rate: float = 0.1, max_leaf_nodes: int = 7,
                 random_state: int = 0, quantile: float | None = None):
        self.n_work = n_work
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.random_state = random_state
        # None: the correction fits the mean log ratio (simulated targets: deterministic); q: its q-quantile
        self.quantile = quantile

    def fit(self, X: np.ndarray, y: np.ndarray) -> KernelRegressor:
        # imported here: estimating with a fitted regressor needs no scikit-learn (a second of start-up)
        from sklearn.ensemble import HistGradientBoostingRegressor
        from sklearn.linear_model import LinearRegression
        from threadpoolctl import threadpool_limits

        X, y = np.asarray(X, dtype=np.float64), np.maximum(np.asarray(y, dtype=np.float64), _FLOOR)
        work = X[:, : self.n_work]
        # relative error matters, not absolute: weight each sample by 1/y² so large kernels don't dominate
        linear = LinearRegression(positive=True, fit_intercept=False).fit(work, y, sample_weight=1.0 / y**2)
        self.coef_ = linear.coef_.astype(np.float64)
        self.forest_ = None
        if len(y) >= _MIN_SAMPLES_FOR_BOOSTING:
            booster = HistGradientBoostingRegressor(
                max_iter=self.max_iter, learning_rate=self.learning_rate, max_leaf_nodes=self.max_leaf_nodes,
                random_state=self.random_state, early_stopping=False, min_samples_leaf=max(2, min(20, len(y) // 50)),
                **({"loss": "quantile", "quantile": self.quantile} if self.quantile is not None else {}),
            )
            with threadpool_limits(**_ONE_THREAD):
                booster.fit(X, np.log(y) - np.log(self._baseline(work)))
            self.forest_ = Forest.from_sklearn(booster)
        return self

    def _baseline(self, work: np.ndarray) -> np.ndarray:
        return np.maximum(work @ self.coef_, _FLOOR)

    def baseline(self, X: np.ndarray) -> np.ndarray:
        """The linear part alone, w · work: what extrapolates beyond the fitted sizes."""
        return self._baseline(np.asarray(X, dtype=np.float64)[:, : self.n_work])

    @property
    def fixed_ms(self) -> float:
        """The baseline's constant term: what a kernel of this kind costs however small."""
        return float(self.coef_[-1])

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if len(X) == 0:
            return np.zeros(0)
        baseline = self._baseline(X[:, : self.n_work])
        return baseline if self.forest_ is None else baseline * np.exp(self.forest_.predict(X))

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"coef": self.coef_}
        if self.forest_ is not None:
            f = self.forest_
            arrays.update(feature=f.feature, threshold=f.threshold, left=f.left, right=f.right, is_leaf=f.is_leaf,
                          value=f.value, roots=f.roots, depth=np.array(f.depth), baseline=np.array(f.baseline))
        return arrays

    @classmethod
    def from_arrays(cls, n_work: int, arrays: dict[str, np.ndarray]) -> KernelRegressor:
        regressor = cls(n_work)
        regressor.coef_ = np.asarray(arrays["coef"], dtype=np.float64)
        regressor.forest_ = None
        if "roots" in arrays:
            regressor.forest_ = Forest(
                feature=arrays["feature"], threshold=arrays["threshold"], left=arrays["left"], right=arrays["right"],
                is_leaf=arrays["is_leaf"].astype(bool), value=arrays["value"], roots=arrays["roots"],
                depth=int(arrays["depth"]), baseline=float(arrays["baseline"]),
            )
        return regressor
