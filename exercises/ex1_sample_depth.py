"""Exercise 1 of 6: sample_depth, how many times the loop runs in one training step.   METHOD.md §3, ~20 minutes

A recurrent-depth model is trained with a *random* number of loop iterations r at every optimizer step, so that at
test time it works at any depth. Huginn (Geiping et al., arXiv 2502.05171) draws r from a "log-normal Poisson": most
draws sit near the mean, a few go much deeper (a heavy tail), so the model now and then practises long loops.

Write the function, then grade it:   python -m exercises check 1   (the model calls yours once per training step)
"""
import math

import torch


def sample_depth(mean_depth, max_depth, generator=None, sigma=0.5):
    """Draw r for one training step; return it as a Python int.

        tau ~ Normal(log(mean_depth) - sigma^2 / 2, sigma)     the log of the Poisson rate, drawn fresh every call
        r   = Poisson(exp(tau)) + 1                            at least one iteration
        r   = min(r, max_depth)                                the tail is heavy: cap it

    The -sigma^2 / 2 makes E[exp(tau)] = mean_depth, so E[r] = mean_depth + 1 before the cap.
    Make every random draw with `generator` (it may be None): one seed then gives the same r on every GPU and after
    a resume, which is how all DDP ranks agree on r without talking to each other.

    Hints: torch.normal(mean, std, size, generator=generator) with size (1,); torch.poisson(rates, generator=generator)
    takes a tensor of rates; .item() turns a one-element tensor into a Python number.
    """
    raise NotImplementedError('exercise 1: write sample_depth')
