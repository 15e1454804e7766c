# Reasoning showcase (README "Does thinking longer help?"), model 3 of 3: the equal-FLOP plain GPT.
# Same inference FLOPs per token as the looped model at r = mean_depth = 4: 1 + 2*4 + 1 = 10 layers plus 4 adapter
# matmuls ~ 10.6 layers; 11 is the closest (flops_per_token(..., backprop_depth=0): 1.04x the looped model's).
# An ordinary GPT in nanoloop's terms (model.plain_config): no prelude/coda, the layers run once, no injection.
# Data and optimizer values are copied from config/reasoning_looped.py: keep them identical (same tokens, same order).
out_dir = 'out-reasoning-plain-flops'
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
n_prelude = 0
n_loop = 11
n_coda = 0
mean_depth = 1
max_depth = 1
backprop_depth = 1
inject = 'none'
init_state = 'embed'
norm_state = False
