# ETD recipe (METHOD.md §4), after step 1 (config/etd_base_shakespeare_char.py) and the conversion: etd.py splits
# the plain GPT into prelude / loop / coda at the knees of its angular-distance curve, keeping every weight, and
# writes out-etd/ckpt.pt. This mid-trains it on the same data with the same optimizer settings while the loop block
# runs r times.
#   python train.py config/etd_base_shakespeare_char.py             # step 1: the plain base
#   python etd.py --init_from=out-etd-base --out_dir=out-etd         # step 2: convert (prints the curve)
#   python train.py config/etd_midtrain_shakespeare_char.py         # step 3: mid-train
#   python etd.py --init_from=out-etd-base --after=out-etd-mid --eval_depths=1,2,4,8   # the table
# The architecture (split, width, inject='none', s_0 = e) comes from the checkpoint; only depth settings are set here.

init_from = 'out-etd/ckpt.pt'  # the converted model of step 2
out_dir = 'out-etd-mid'
eval_interval = 250
eval_iters = 10
log_interval = 10
sample_tokens = 0

dataset = 'shakespeare_char'
batch_size = 32
block_size = 64

# depth: random r with E[r] = mean_depth + 1, capped at max_depth (our extension; ETD itself trains one fixed k:
# --fixed_depth=True --mean_depth=2 --max_depth=2). Backprop through every iteration: with inject='none' a truncated
# loop would cut the prelude's gradient (METHOD.md §3 trap).
fixed_depth = False
mean_depth = 2
max_depth = 6
backprop_depth = 6
dropout = 0.0

# the same optimizer settings as step 1
learning_rate = 2e-3
max_iters = 500
lr_decay_iters = 0    # = max_iters
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100

device = 'cpu'
dtype = 'float32'
compile = False
