"""The held-out split keeps one item of every class of two or more, however small the
fraction: a class of two (two corrected jobs of a label, say) at the default 20% used
to round to none, and `mmq train` then had no held-out accuracy to report."""

import torch

from core.training.datasets import split_indices


def test_every_class_of_two_or_more_holds_one_out():
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    train, test = split_indices(y, 0.2, seed=0, at_least_one=True)
    held = [int(y[i]) for i in test]
    assert sorted(held) == [0, 1, 2, 2]  # 2 -> 1, 3 -> 1 (0.6 rounds up), 10 -> 2
    assert sorted(train + test) == list(range(len(y)))
    assert split_indices(y, 0.2, seed=0)[1] != test  # the old rule: none of class 0
    assert split_indices(y, 0.0, seed=0, at_least_one=True)[1] == []  # nothing asked
