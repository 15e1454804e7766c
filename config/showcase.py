# The depth showcase (README "Thinking longer pays"): prefix sums mod 3, a target at every position; digit t needs t
# sequential additions. The loop trains at depths up to max_depth and is tested up to 4x beyond it:
#   python compare.py config/showcase.py --seeds=1337,1338 --plot=True
out_dir = 'out-showcase'
eval_interval = 1000

dataset = 'prefix_sums'        # prepared on first use: BOS + 32 digits per example, 200k train, 4k test
block_size = 33

n_embd = 64
n_prelude = 1
n_loop = 1
n_coda = 1
mean_depth = 6
max_depth = 12                 # the training cap: r + 2 layers reach 14 digits; digits 15-32 need a longer loop
backprop_depth = 6
window = 2                     # attention sees itself and the token before: one more iteration, one more digit
pos = 'rope'                   # relative positions: the step from digit t-1 to t is the same everywhere
norm = 'pre'                   # GPT-2 blocks: sandwich blocks did not learn this task in 3000 steps (RESULTS.md)
init_state = 'zeros'

learning_rate = 1e-3            # 2e-3 stalled at 5 digits (RESULTS.md)
max_iters = 6000
min_lr = 1e-4
warmup_iters = 200

device = 'cpu'
dtype = 'float32'
compile = False
