# Reasoning showcase (README "Does thinking longer help?"), model 1 of 3: the looped model.
# 1 prelude + 2 loop x r + 1 coda layers, random depth r around mean_depth (METHOD.md §3), Huginn's concat injection and
# noise initial state (§2). Full size, one GPU: python train.py config/reasoning_looped.py
# CPU size (2 cores): run_reasoning_showcase.sh cpu adds the smaller overrides. The three reasoning_*.py configs share
# every data/optimizer value below so that all three see the same tokens in the same order (same seed).
out_dir = 'out-reasoning-looped'
dataset = 'reasoning'          # python prepare.py reasoning (hops 1..4 in training, 1..8 in test.pkl)
batch_size = 64
block_size = 128               # a line is at most 108 chars (meta.pkl max_line_len)
max_iters = 5000
lr_decay_iters = 5000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 200
eval_interval = 500
eval_iters = 10
always_save_checkpoint = True  # evaluate the final weights, not the lowest-val-loss ones
sample_tokens = 0
seed = 1337

n_embd = 256
n_head = 8
n_prelude = 1
n_loop = 2
n_coda = 1
mean_depth = 4                 # training r ~ log-normal Poisson + 1: E[r] = 5
max_depth = 8                  # cap on the drawn r (test time goes beyond: reasoning.py evaluates up to r = 32)
backprop_depth = 4
inject = 'concat'
init_state = 'noise'
norm_state = True              # bounded state for any r (METHOD.md §3 trap)
