"""
Exercise 6 of 6 (the hardest): fill_latest, the early-exit KV cache.   METHOD.md §5, ~50 minutes

Decoding with a KV cache keeps keys and values for every layer and every position. In a looped model every
iteration of the loop has its own: the cache holds loop_kv[i, j] for iteration i and loop layer j.

With early exit (exercise 4) a token may stop after d of R iterations, so it writes nothing meaningful for the
iterations d..R-1. But a later token may iterate longer, and at iteration i > d its attention still reads every
earlier position. Huginn's answer, the "latest" lookup: a missing entry is replaced by the latest iteration that has
one, for the same loop layer. Done once, right after the token exits, it is a copy: entry d-1 goes to d, d+1, ..., R-1.

The model checks this exactly: decoding with early exit must give the same logits as one uncached forward pass in
which each position runs its own depth (model.GPT.forward(idx, depths=...)).

Write the function, then grade it:   python -m exercises check 6
The model calls fill_latest(cache.loop, depths, pos) after each decoded token (GPT.forward_cached).
"""

import torch


def fill_latest(loop_kv, depths, pos):
    """Complete the cache entries of the token at position `pos` in place, after it exited early. Returns nothing.

    loop_kv: (iters, n_loop, 2, B, H, T, hd) tensor: keys ([:, :, 0]) and values ([:, :, 1]) of every iteration,
             every loop layer, every row b of the batch, every head and every position.
    depths:  (B,) LongTensor with values in 1..iters: how many iterations row b ran at position pos.
    pos:     int, the position just decoded.

    For every row b and every iteration i >= depths[b]: loop_kv[i, :, :, b, :, pos] = loop_kv[depths[b] - 1, :, :, b,
    :, pos]. Every other entry (iterations < depths[b], other positions) stays exactly as it was. Each row of the
    batch exited on its own, so each has its own depth.

    Hints: first make it right with a loop over rows and iterations. Then, if you like, vectorise: the source
    iteration is src[i, b] = min(i, depths[b] - 1), a (iters, B) tensor, and torch.gather along dim 0 reads
    loop_kv[:, :, :, :, :, pos] at those iterations in one call (expand src to that slice's shape first).
    """
    raise NotImplementedError('exercise 6: write fill_latest')
