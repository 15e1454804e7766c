# ETD recipe, step 1 of 3 (METHOD.md §4): pretrain an ordinary 6-layer GPT on shakespeare_char, a few CPU minutes.
# r = 1 with no injection, s_0 = e and no state norm is exactly a plain GPT (§1), the base that etd.py can split.
#   python train.py config/etd_base_shakespeare_char.py
# next: config/etd_midtrain_shakespeare_char.py

out_dir = 'out-etd-base'
eval_interval = 500
eval_iters = 10
log_interval = 10
sample_tokens = 0

dataset = 'shakespeare_char'
batch_size = 32
block_size = 64

n_embd = 128
n_head = 4
n_prelude = 0         # a plain GPT: all 6 layers in one pass of the "loop"
n_loop = 6
n_coda = 0
mean_depth = 1        # r = 1 always (max_depth caps the draw)
max_depth = 1
backprop_depth = 1
inject = 'none'
init_state = 'embed'
norm_state = False
dropout = 0.0

learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 0    # = max_iters
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100

device = 'cpu'
dtype = 'float32'
compile = False
