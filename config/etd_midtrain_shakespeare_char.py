# ETD recipe, step 2 of 3 (METHOD.md §4): split the plain GPT of step 1 into encoder / thinking / decoder at the knees
# of its angular-distance curve (etd.py prints it), keep every weight, and mid-train on the same data with the same
# optimizer settings while the thinking block runs r times.
#   python train.py config/etd_base_shakespeare_char.py      # step 1
#   python train.py config/etd_midtrain_shakespeare_char.py  # step 2
#   python etd.py --init_from=out-etd-base --after=out-etd-mid --eval_depths=1,2,4,8   # step 3: the table
# The architecture (split, width, inject='none', s_0 = e) comes from the base; only depth settings are set here.

init_from = 'out-etd-base'  # the plain GPT of step 1 (or 'gpt2'... with a GPT-2 BPE dataset and transformers)
etd_split = 'auto'          # or 'n_prelude,n_loop,n_coda', e.g. '2,3,1'
etd_sequences = 128         # last tokens of 128 training windows make the curve (ETD: 10k held-out samples)
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
# loop would cut the encoder's gradient (METHOD.md §3 trap).
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
