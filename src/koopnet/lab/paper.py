"""The paper's published numbers, as data, so reports can print ours next to theirs.

Aswani, Jabari, Shafique 2024 (arXiv 2409.01308). The MNIST grid is the authors'
``figures/mnist_accuracies.csv`` (paper-method section 9): hybrid test accuracy on the 10k MNIST
test set, EDMD rank 500, concatenated-series DMD on raw-pixel trajectories. The paper names the
replaced position by ``LAYER_START`` s in {1, 3, 5}; koopnet uses the hidden layer k = (s+1)/2,
so the keys here are k in {1, 2, 3}.

Nothing in koopnet reads these numbers to decide anything: they are printed for comparison only.
"""

from __future__ import annotations

#: Yin-Yang, paper-method section 9: original network, best hybrid in the paper, and the only
#: saved hybrid run (s=1, M=5000, h=10, full rank) on the 4k seed-123 set.
PAPER_YINYANG = {"original": 0.984, "best_hybrid": 0.973, "saved_hybrid_layer1": 0.912}

#: MNIST headline numbers: original network, scaled model (s=5), best hybrid (s=5, M=500, h=10).
PAPER_MNIST = {"original": 0.972, "scaled_layer3": 0.9683, "best_hybrid": 0.958}

#: Trajectory counts M and numbers of delays h of the MNIST grid.
PAPER_MNIST_TRAJECTORIES = (1, 10, 50, 500)
PAPER_MNIST_DELAYS = tuple(range(1, 11))

_ROWS = {
    (1, 1): (.1028, .1028, .1028, .1028, .1028, .1028, .1028, .1028, .1028, .1028),
    (1, 10): (.4312, .5377, .5373, .5337, .5347, .5187, .5227, .5187, .5011, .5254),
    (1, 50): (.3714, .6598, .7151, .7383, .7241, .7631, .8138, .8265, .8212, .8376),
    (1, 500): (.6666, .8110, .8584, .8642, .8829, .8894, .8986, .9069, .9075, .9204),
    (2, 1): (.1135, .1135, .1135, .1135, .1701, .1135, .1135, .1135, .1135, .0974),
    (2, 10): (.2656, .2889, .4002, .4639, .4800, .4823, .5088, .4991, .4975, .5284),
    (2, 50): (.6717, .7408, .8065, .8532, .8813, .8934, .8909, .8969, .9213, .9247),
    (2, 500): (.4522, .8457, .8899, .9169, .9195, .9334, .9378, .9429, .9483, .9481),
    (3, 1): (.1009, .1009, .1009, .1009, .1009, .0633, .1009, .1009, .1009, .1028),
    (3, 10): (.1820, .2955, .3777, .3691, .4319, .4814, .5143, .5177, .5811, .5962),
    (3, 50): (.2697, .6143, .7870, .7362, .7914, .8863, .9113, .9254, .9490, .9486),
    (3, 500): (.2822, .6660, .8420, .9038, .9457, .9552, .9591, .9536, .9579, .9580),
}

#: (hidden layer k, trajectories M, delays h) -> hybrid test accuracy in [0, 1]; 120 cells.
PAPER_MNIST_GRID: dict[tuple[int, int, int], float] = {
    (layer, m, h): value
    for (layer, m), values in _ROWS.items()
    for h, value in zip(PAPER_MNIST_DELAYS, values, strict=True)
}
