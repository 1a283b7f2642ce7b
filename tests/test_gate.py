"""The promotion gate's policy, without a registry: McNemar's test, the margin, significance, and refusing
predictions that do not pair (kiln.evaluate.gate)."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from kiln.evaluate.gate import Evidence, Gate, first, judge, predictions_record
from kiln.evaluate.stats import mcnemar_exact
from kiln.platform.codebase import closure
from tests.conftest import REPO

LABELS = np.arange(100) % 10
IMAGES = np.zeros((100, 1, 2, 2), np.uint8)
GATE = Gate("test_accuracy", margin=0.0, alpha=0.05)


def evidence(wrong: range, images: np.ndarray = IMAGES) -> Evidence:
    """A version that gets exactly the items in `wrong` wrong: its accuracy and paired predictions."""
    labels = LABELS[: len(images)]
    predicted = labels.copy()
    predicted[list(wrong)] = (labels[list(wrong)] + 1) % 10
    return Evidence(float((predicted == labels).mean()), predictions_record(images, labels, predicted))


def test_mcnemar_matches_a_hand_computed_case() -> None:
    first_correct = np.array([1, 0, 0, 0, 0, 0, 1, 1, 0], bool)
    second_correct = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    test = mcnemar_exact(first_correct, second_correct)
    # b=1, c=5: two-sided binomial(6, 1/2) tail = 2 * (C(6,0) + C(6,1)) / 2**6 = 14/64
    assert (test.b, test.c, test.p_value) == (1, 5, pytest.approx(14 / 64))
    assert mcnemar_exact(first_correct, first_correct).p_value == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        mcnemar_exact(first_correct, second_correct[:3])


def test_the_first_version_is_promoted_without_a_comparison() -> None:
    decision = first(GATE, "1", evidence(range(10)))
    assert decision.promoted and decision.reason == "no champion yet" and decision.p_value is None


def test_better_but_not_significant_is_not_promoted() -> None:
    decision = judge(GATE, "2", evidence(range(3, 10)), "1", evidence(range(10)))  # b=3, c=0: p=0.25
    assert not decision.promoted and "not significant" in decision.reason
    assert (decision.delta, decision.b, decision.c, decision.p_value) == (0.03, 3, 0, 0.25)


def test_better_and_significant_is_promoted_and_worse_is_not() -> None:
    decision = judge(GATE, "2", evidence(range(15, 22)), "1", evidence(range(20)))  # b=15, c=2
    assert decision.promoted and (decision.b, decision.c) == (15, 2) and decision.p_value < 0.01
    assert (decision.champion_version, decision.champion_value, decision.value) == ("1", 0.80, 0.93)
    worse = judge(GATE, "3", evidence(range(20)), "2", evidence(range(15, 22)))
    assert not worse.promoted and worse.delta == -0.13


def test_an_improvement_below_the_margin_is_not_promoted() -> None:
    gate = Gate("test_accuracy", margin=0.2, alpha=0.05)
    champion = evidence(range(20))
    decision = judge(gate, "2", evidence(range(5)), "1", champion)  # +0.15, b=15, c=0: significant
    assert not decision.promoted and "margin" in decision.reason and decision.p_value < 0.001
    assert judge(gate, "3", evidence(range(0)), "1", champion).promoted  # +0.20 reaches it


@pytest.mark.bad_input
def test_predictions_on_another_test_split_are_refused() -> None:
    champion = evidence(range(20))
    smaller = judge(GATE, "2", evidence(range(0), IMAGES[:50]), "1", champion)
    assert not smaller.promoted and "tested on 100 items, this version on 50" in smaller.reason
    other = judge(GATE, "3", evidence(range(0), IMAGES + 1), "1", champion)
    assert not other.promoted and "different test split" in other.reason and other.p_value is None


def test_the_gate_policy_imports_no_mlflow() -> None:
    """Through every project module it imports (read, not run: the quick loop stays quick)."""
    imported = set()
    for file in closure([REPO / "kiln/evaluate/gate.py"], REPO):
        for node in ast.walk(ast.parse((REPO / file).read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
    assert not [name for name in imported if name.split(".")[0] == "mlflow"]
    assert "numpy" in imported, "the check reads the imports"
