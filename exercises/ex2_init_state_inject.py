"""Exercise 2 of 6: init_state and inject, where the loop starts and how it keeps its input.   METHOD.md §2, ~25 min

    e   = Prelude(tokens)                            the prelude's output, (B, T, C)
    s_0 = init_state(e)                              <- you write this
    s_i = Loop(inject(s_{i-1}, e))   for i = 1..r    <- and this

Huginn (arXiv 2502.05171) starts the state from noise and re-injects e at the start of every iteration through a
small adapter, so the loop must learn to converge from anywhere and can never forget the input. ETD (arXiv
2510.07358) loops a pretrained GPT: its state starts as e, nothing is injected, one iteration is the original network.

Write both functions, then grade them:   python -m exercises check 2
"""
import torch


def init_state(e, kind, std, generator=None):
    """The loop's first state s_0: a tensor of e's shape, dtype and device.

        'embed'   s_0 = e          ETD: the loop continues the prelude's residual stream
        'zeros'   s_0 = 0          deterministic: tests and exact evaluation use it
        'noise'   s_0 ~ Normal(0, std^2) cut at -3 std and +3 std, fresh for every token and every call (Huginn)

    Draw the noise with `generator` (it may be None) so that a seed makes the whole forward pass exact.
    A torch.Generator only draws on its own device: draw on generator.device when one is given, then move to e.device.

    Hints: torch.nn.init.trunc_normal_(tensor, mean, std, a, b, generator=generator) fills a tensor in place, with a
    and b the absolute cut points; torch.empty(shape, dtype=..., device=...); torch.zeros_like.
    """
    raise NotImplementedError('exercise 2: write init_state')


def inject(s, e, kind, adapter=None):
    """Put the input e back into the state s at the start of an iteration; returns a tensor of s's shape (B, T, C).

        'concat'   adapter([s ; e])   Huginn: s and e side by side on the last dim (state first), then the adapter, a
                                      bias-free nn.Linear(2C, C) that the model passes in
        'add'      s + e              no parameter
        'none'     s                  ETD: plain residual iteration; adapter is None

    Why: without injection the prelude's output reaches the loop only through s_0, so after a few iterations (and
    with truncated backprop, exercise 3) the prelude has no say and gets no gradient.

    Hint: torch.cat([a, b], dim=-1).
    """
    raise NotImplementedError('exercise 2: write inject')
