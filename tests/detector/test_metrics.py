"""Detection metrics on small examples whose values are known by hand."""

from __future__ import annotations

import pytest

from detector.metrics import ScoredSample, best_threshold, binary_metrics, grouped_metrics


def test_auc_and_ap_of_separated_reversed_and_tied_scores():
    labels = [0, 0, 1, 1]
    perfect = binary_metrics(labels, [0.1, 0.2, 0.8, 0.9], 0.5)
    assert perfect["auc"] == 1.0 and perfect["ap"] == 1.0
    reversed_ = binary_metrics(labels, [0.9, 0.8, 0.2, 0.1], 0.5)
    assert reversed_["auc"] == 0.0
    # All scores tied: no ranking information, AUC 0.5; AP is then the fake prevalence.
    tied = binary_metrics(labels, [0.5, 0.5, 0.5, 0.5], 0.5)
    assert tied["auc"] == 0.5 and tied["ap"] == 0.5
    # One real tied with one fake, otherwise separated: 3.5 of 4 pairs ordered.
    partial = binary_metrics(labels, [0.1, 0.6, 0.6, 0.9], 0.5)
    assert partial["auc"] == pytest.approx(3.5 / 4)


def test_accuracies_at_the_threshold():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.5, 0.7, 0.4, 0.9]
    m = binary_metrics(labels, scores, 0.5)
    # score >= threshold is fake: 0.5 counts as fake.
    assert m["n_real"] == 3 and m["n_fake"] == 2
    assert m["real_acc"] == pytest.approx(1 / 3)
    assert m["fake_acc"] == pytest.approx(1 / 2)
    assert m["acc"] == pytest.approx(2 / 5)
    assert m["balanced_acc"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # Another threshold changes the accuracies but never AUC or AP.
    m2 = binary_metrics(labels, scores, 0.8)
    assert m2["real_acc"] == 1.0 and m2["fake_acc"] == 0.5
    assert (m2["auc"], m2["ap"]) == (m["auc"], m["ap"])


def test_one_class_has_no_auc_ap_or_balanced_accuracy():
    m = binary_metrics([1, 1], [0.2, 0.8], 0.5)
    assert m["auc"] is None and m["ap"] is None and m["balanced_acc"] is None
    assert m["real_acc"] is None and m["fake_acc"] == 0.5
    with pytest.raises(ValueError, match="shape"):
        binary_metrics([0, 1], [0.5], 0.5)


def test_per_generator_uses_the_reals_of_the_same_modality():
    s = [
        ScoredSample(0, "CT", "real", 0.1),
        ScoredSample(0, "CT", "real", 0.2),
        ScoredSample(1, "CT", "g1", 0.9),
        ScoredSample(1, "CT", "g2", 0.15),   # below one CT real: AUC 0.5 against the CT reals
        ScoredSample(0, "MR", "real", 0.95),  # an MR real above every fake: must not count for CT
        ScoredSample(1, "MR", "g1", 0.3),
    ]
    m = grouped_metrics(s, 0.5)
    assert set(m["per_generator"]) == {"CT/g1", "CT/g2", "MR/g1"}
    ct_g1 = m["per_generator"]["CT/g1"]
    assert (ct_g1["n_real"], ct_g1["n_fake"], ct_g1["auc"]) == (2, 1, 1.0)
    assert m["per_generator"]["CT/g2"]["auc"] == 0.5
    assert m["per_generator"]["MR/g1"]["auc"] == 0.0 and m["per_generator"]["MR/g1"]["n_real"] == 1
    assert m["per_modality"]["CT"]["n_real"] == 2 and m["per_modality"]["CT"]["n_fake"] == 2
    assert m["overall"]["n_real"] == 3 and m["overall"]["n_fake"] == 3


def test_best_threshold_picks_the_balanced_accuracy_optimum():
    # Separable: any threshold in (0.4, 0.6) is perfect; candidates are midpoints, so 0.5.
    assert best_threshold([0, 0, 1, 1], [0.2, 0.4, 0.6, 0.8]) == pytest.approx(0.5)
    # Imbalanced: 4 reals, 1 fake. Plain accuracy would put the threshold above the fake
    # (4/5 correct); balanced accuracy prefers catching it: t between 0.3 and 0.5 gives
    # real_acc 3/4 and fake_acc 1, balanced 0.875 > 0.5 of "all real".
    labels = [0, 0, 0, 0, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.5]
    t = best_threshold(labels, scores)
    assert 0.3 < t <= 0.5
    assert t == pytest.approx(0.4)
    assert binary_metrics(labels, scores, t)["balanced_acc"] == pytest.approx(0.875)
    # Reversed scores: "score >= t is fake" is at best chance, and the threshold says so.
    t = best_threshold([0, 1], [0.9, 0.1])
    assert binary_metrics([0, 1], [0.9, 0.1], t)["balanced_acc"] == 0.5
    # Ties in balanced accuracy go to the candidate closest to 0.5: 0.15 and 0.75 both
    # give 0.75 (one real or one fake missed); 0.75 is nearer.
    assert best_threshold([0, 1, 0, 1], [0.1, 0.2, 0.6, 0.9]) == pytest.approx(0.75)
    # One class only: nothing to separate.
    assert best_threshold([1, 1], [0.3, 0.7]) == 0.5
    assert best_threshold([], []) == 0.5
