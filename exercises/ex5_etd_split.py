"""Exercise 5 of 6: angular_distances, find_knee, choose_split: where ETD cuts a trained GPT.   METHOD.md §4, ~40 min

ETD (Koishekenov et al., arXiv 2510.07358) cuts a pretrained L-layer GPT into encoder / thinking block / decoder (our
prelude / loop / coda) and then iterates the loop. Where to cut? Run the model on text, keep the residual stream
h_0..h_L after every block, and measure how much each block turns it:

    d(l, l+1) = arccos(cos(h_l, h_{l+1})) / pi        0: same direction, 0.5: orthogonal, 1: reversed

The curve is large in the first blocks, flat and small in the middle (iterative refinement) and rises again at the
end. Kneedle finds where the early drop turns flat: the end of the prelude. The same on the reversed curve finds
where the coda starts. For OLMo-2-1B (16 layers) ETD finds 7 / 4 / 5.

Write the three functions, then grade them:   python -m exercises check 5   (etd.convert uses yours)
"""
import math

import torch
from torch.nn import functional as F


def angular_distances(hidden_states, last_token=True):
    """How far each block turns the residual stream: (L + 1, B, T, C) -> (L,), averaged over tokens.

    hidden_states[l] is h_l, the stream after block l (h_0: the embeddings). For each block l = 0..L-1,
    d(l, l+1) = arccos(cos(h_l, h_{l+1})) / pi per token (cosine over C), then the mean over batch and tokens.
    last_token=True uses only the last position of each sequence (ETD, following Gromov et al. 2024); False uses all.

    Hints: F.cosine_similarity(a, b, dim=-1); compute in float64 (.double()): arccos is steep near 1, where float32
    rounding shows; clamp the cosine to [-1, 1] before arccos; .flatten(1).mean(1) averages all but the first dim.
    """
    raise NotImplementedError('exercise 5: write angular_distances')


def find_knee(curve):
    """Kneedle (Satopaa et al. 2011) for a falling curve: the index where the steep drop turns flat.

    curve: a list of n floats. Put the points on [0, 1] x [0, 1]: x_i = i / (n - 1), y scaled so that min -> 0 and
    max -> 1 (a flat curve: all y = 0). The knee is the point farthest below the chord x + y = 1 from (0, 1) to (1, 0),
    the index with the largest 1 - x_i - y_i. Return a Python int (0 for a flat curve, the first index on a tie).

    Hints: torch.linspace(0, 1, n); argmax returns the first maximum; int(...) of a one-element tensor.
    """
    raise NotImplementedError('exercise 5: write find_knee')


def choose_split(curve, n_layer):
    """ETD's split from the curve (one value per block): -> (n_prelude, n_loop, n_coda), adding up to n_layer.

    The knee of the curve is the loop's first block: the prelude is every block before it. The knee of the reversed
    curve (curve[::-1]) counts from the end: the loop's last block is n_layer - 1 - that. The coda is everything
    after the loop's last block. n_loop is always >= 1 (the two knees cannot cross).
    """
    raise NotImplementedError('exercise 5: write choose_split')
