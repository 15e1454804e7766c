"""Exercise 6 of 6 (the hardest): fill_latest, the early-exit KV cache.   METHOD.md §5, ~50 minutes

Decoding with a KV cache keeps keys and values for every layer and every position. In a looped model every
iteration of the loop has its own: the cache holds loop_kv[i, j] for iteration i and loop layer j.

With early exit (exercise 4) a token may stop after d of r iterations: it never runs iterations d..r-1 and writes
nothing meaningful there. A later token may iterate longer, and at every iteration its attention reads every earlier
position's keys and values of that iteration, the stopped token's included.

What should it read there? The model's answer is fixed by one exact test: decoding with early exit must give the same
logits as ONE uncached forward pass in which each position runs its own depth, model.GPT.forward(idx, depths=...).
Read GPT.loop_step (the `held` inputs) and METHOD.md §5 "Per-token depth", then write down before coding:
  1. A position that stopped is frozen in that forward pass. What does each loop layer see as its input there, and so
     which keys and values does it show later positions at iterations beyond its depth?
  2. Why does writing exactly those into loop_kv once, when the token exits, make cached decoding equal it ever after?

Write the function, then grade it:   python -m exercises check 6
The model calls fill_latest(cache.loop, depths, pos) after each decoded token (GPT.forward_cached). A failed check
first asks the question again; run it once more after a failure for a hint that gives more away.
"""
import torch


def fill_latest(loop_kv, depths, pos):
    """Complete the cache entries of the token at position `pos` in place, after it exited early. Returns nothing.

    loop_kv: (r, n_loop, 2, B, H, T, hd) tensor: keys ([:, :, 0]) and values ([:, :, 1]) of every iteration, every
             loop layer, every row b of the batch, every head and every position.
    depths:  (B,) LongTensor with values in 1..r: how many iterations row b ran at position pos.
    pos:     int, the position just decoded.

    Write only what the questions above say is missing: every entry a row computed itself (iterations < depths[b])
    and every other position stay exactly as they were. Each row of the batch exited on its own, so each has its
    own depth. First make it right with loops over rows and iterations; then, if you like, vectorise it.
    """
    raise NotImplementedError('exercise 6: write fill_latest')
