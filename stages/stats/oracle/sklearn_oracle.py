"""Prints the scikit-learn numbers committed as constants in src/evaluator.rs (tests::sklearn).

Run once by hand (CI has no Python): `python3 stages/stats/oracle/sklearn_oracle.py`.
Probabilities are float32 (as tessera stores them), widened to float64 as the Rust code does.
"""
import warnings

import numpy as np
import sklearn
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

CASES = {
    # Three classes, probabilities on a 0.1 grid: many ties within and across classes.
    "MULTICLASS": (
        [0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0],
        [
            [0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3],
            [0.3, 0.6, 0.1], [0.5, 0.3, 0.2], [0.3, 0.5, 0.2], [0.2, 0.2, 0.6],
            [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.3, 0.2, 0.5], [0.6, 0.2, 0.2],
        ],
    ),
    # Binary with ties across the classes.
    "BINARY": (
        [0, 0, 1, 1, 0, 1, 0, 1, 1, 0],
        [
            [0.8, 0.2], [0.6, 0.4], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6],
            [0.1, 0.9], [0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.6, 0.4],
        ],
    ),
}


def main():
    # float32 rows widened to float64 do not sum to exactly 1; the loss is not renormalized.
    warnings.simplefilter("ignore", UserWarning)
    print(f"# scikit-learn {sklearn.__version__}")
    for name, (labels, probs) in CASES.items():
        y = np.array(labels)
        p = np.array(probs, dtype=np.float32).astype(np.float64)
        c = p.shape[1]
        pred = p.argmax(axis=1)
        onehot = np.eye(c)[y]
        prec, rec, f1, _ = precision_recall_fscore_support(
            y, pred, labels=range(c), average=None, zero_division=0
        )
        mp, mr, mf, _ = precision_recall_fscore_support(
            y, pred, average="macro", zero_division=0
        )
        auc = [roc_auc_score(onehot[:, k], p[:, k]) for k in range(c)]
        ap = average_precision_score(onehot, p, average=None)
        print(f"{name}: predicted {pred.tolist()}")
        print(f"  balanced_accuracy {balanced_accuracy_score(y, pred)!r}")
        print(f"  precision {mp!r} recall {mr!r} f1 {mf!r}")
        print(f"  per-class precision {prec.tolist()} recall {rec.tolist()} f1 {f1.tolist()}")
        print(f"  auc per class {auc} macro {np.mean(auc)!r}")
        print(f"  auprc per class {ap.tolist()} macro {np.mean(ap)!r}")
        print(f"  cross_entropy {log_loss(y, p, labels=range(c))!r}")


main()
