"""Exercise 4 of 6: kl_converged, when may a token stop iterating?   METHOD.md §5, ~20 minutes

At test time a looped model can spend fewer iterations on easy tokens. Huginn's zero-shot rule (arXiv 2502.05171):
after every iteration, run the coda on the state to get a next-token distribution p_i and stop once it has stopped
changing, KL(p_i || p_{i-1}) < eps (Huginn: eps = 5e-4), else run to the maximum depth.

Before the first iteration there is no previous prediction: the exit test (sample.ExitTest) passes the uniform
distribution, log p_prev = -log V for every token, so the first test asks "is p_1 already within eps of uniform?".

Write the function, then grade it:   python -m exercises check 4
The check puts yours in model.EXIT_RULES['kl'], where sample.generate and sample.adaptive_forward look the rule up.
"""
import torch


def kl_converged(logp_prev, logp, eps):
    """True where the next-token distribution stopped changing: KL(p || p_prev) < eps.

    logp_prev, logp: (..., V) log-probabilities after the previous and the current iteration (log_softmax, fp32).
    eps: a float >= 0. Returns a bool tensor of shape (...): one answer per token, the vocabulary summed out.

        KL(p || p_prev) = sum_v p(v) * (log p(v) - log p_prev(v))      weighted by the NEW distribution p

    Trap (measured): in fp32 the KL of two nearly equal distributions comes out around -1e-7. eps = 0 means "never
    exit", so a negative KL must not pass the test: clamp the KL at 0, and compare strictly (<).

    Hints: logp.exp() is p; .sum(-1) sums over the vocabulary; .clamp_min(0).
    """
    raise NotImplementedError('exercise 4: write kl_converged')
