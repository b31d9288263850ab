"""Metric formulas on hand-made accuracy matrices (SPEC, Metrics)."""
import pytest

from sparsecl.metrics.accuracy import average_accuracy, backward_transfer, forgetting, forward_transfer, summarize

# R[i][j]: accuracy on task j after training task i (future entries filled, as the engine measures them).
R = [
    [90.0, 20.0, 10.0],
    [70.0, 80.0, 30.0],
    [60.0, 75.0, 85.0],
]
B = [10.0, 15.0, 12.0]


def test_acc_is_mean_of_last_row():
    assert average_accuracy(R) == pytest.approx((60 + 75 + 85) / 3)


def test_bwt_compares_final_with_just_learned():
    assert backward_transfer(R) == pytest.approx(((60 - 90) + (75 - 80)) / 2)


def test_fwt_uses_accuracy_before_training_minus_random_init():
    assert forward_transfer(R, B) == pytest.approx(((20 - 15) + (30 - 12)) / 2)


def test_forgetting_uses_best_accuracy_after_learning_not_before():
    # Task 0's best is 90 (row 0); task 1's best is 80 (row 1), its pre-training 20 must not count.
    R2 = [[50.0, 95.0, 0.0], [90.0, 80.0, 0.0], [60.0, 75.0, 85.0]]
    assert forgetting(R2) == pytest.approx(((90 - 60) + (80 - 75)) / 2)
    assert forgetting(R) == pytest.approx(((90 - 60) + (80 - 75)) / 2)


def test_no_forgetting_gives_zero_bwt_and_forgetting():
    R3 = [[80.0, 0.0], [80.0, 70.0]]
    s = summarize(R3, [0.0, 50.0])
    assert s["bwt"] == 0 and s["forgetting"] == 0 and s["fwt"] == -50.0 and s["acc"] == 75.0


def test_single_task_transfer_metrics_are_undefined():
    s = summarize([[42.0]], [10.0])
    assert s == {"acc": 42.0, "bwt": None, "fwt": None, "forgetting": None}


def test_non_square_matrix_is_rejected():
    with pytest.raises(ValueError):
        average_accuracy([[1.0, 2.0], [3.0]])


def test_correct_predictions_counts_each_class_set_over_batches():
    """The one counting loop of evaluation: argmax with the classes outside each set at -inf,
    over batches that do not divide the split, the inputs transformed first."""
    import torch

    from sparsecl.metrics.predictions import correct_predictions, percent

    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0], [0.0, 3.0, 4.0, 1.0], [1.0, 0.0, 0.0, 9.0],
                           [2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]])
    x, y = torch.arange(5.0), torch.tensor([0, 1, 3, 1, 2])
    seen = []
    correct = correct_predictions(lambda i: logits[i.long()], x, y, [torch.arange(4), torch.tensor([0, 1])],
                                  batch_size=2, transform=lambda b: seen.append(len(b)) or b)
    # all classes: argmax 0, 2, 3, 0, 3 -> right on examples 0 and 2; classes {0, 1}: 0, 1, 0, 0, 0 -> 0, 1
    assert correct.tolist() == [2, 2] and seen == [2, 2, 1]
    assert percent(correct, 5) == [40.0, 40.0]
