"""Exercise 3 of 6: truncated_loop, run the loop r times, backprop through the last k only.   METHOD.md §3, ~25 min

Training draws a depth r every step (exercise 1), sometimes r = 30 or more. Backpropagating through all r iterations
would store activations for each of them: memory O(r), and the deep draws would not fit. Huginn runs the first r - k
iterations without autograd and only the last k with it (k = 8 in the paper): activation memory O(k) whatever r is,
forward cost O(r), backward O(k). The prelude still learns, through the injection in the last k iterations.

Write the function, then grade it:   python -m exercises check 3
The model's forward is   s = truncated_loop(step, s, r, config.backprop_depth)   with step(s, i) one loop iteration.
"""
import torch


def truncated_loop(step, s, r, k):
    """Apply step r times, s = step(s, i) for i = 0, 1, ..., r - 1 in order, and return the final s.

    Autograd may record only the last min(r, k) calls: run the first max(r - k, 0) of them under torch.no_grad().
    When r <= k every call is recorded. Call step exactly r times, never more.

    Hints: `with torch.no_grad():` around a for loop; range(a, b); no .detach() needed: no_grad states carry no graph.
    """
    raise NotImplementedError('exercise 3: write truncated_loop')
