# ETD recipe, step 1 of 3 (METHOD.md §4): pretrain an ordinary 6-layer GPT on shakespeare_char, a few CPU minutes.
# r = 1 with no injection and s_0 = e is exactly a plain GPT (§1), the base that etd.py can split.
# Every other value is train.py's default (the CPU demo's data, width and optimizer).
#   python train.py config/etd_base_shakespeare_char.py
# next: config/etd_midtrain_shakespeare_char.py

out_dir = 'out-etd-base'
eval_interval = 500
sample_tokens = 0
max_iters = 2000

n_prelude = 0         # a plain GPT: all 6 layers in one pass of the "loop"
n_loop = 6
n_coda = 0
mean_depth = 1        # r = 1 always (max_depth caps the draw)
max_depth = 1
backprop_depth = 1
inject = 'none'
init_state = 'embed'

device = 'cpu'
dtype = 'float32'
compile = False
