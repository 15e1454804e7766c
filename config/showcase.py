# The depth showcase (README "Thinking longer"): prefix sums mod 3, a target at every position; position t needs t
# sequential additions. Trained at depths up to max_depth, tested up to 4x beyond it by compare.py:
#   python compare.py config/showcase.py
out_dir = 'out-showcase'
eval_interval = 500
eval_iters = 10

dataset = 'prefix_sums'        # prepared on first use (prepare.py prefix_sums: 32 digits per example)
batch_size = 32
block_size = 32

n_embd = 64
n_head = 4
n_prelude = 1
n_loop = 1
n_coda = 1
mean_depth = 6
max_depth = 12                 # the training cap: positions beyond what 12 iterations reach test extrapolation
backprop_depth = 6
inject = 'add'
init_state = 'zeros'
norm = 'sandwich'
pos = 'rope'
norm_state = False

learning_rate = 1e-3
max_iters = 5000
min_lr = 1e-4
warmup_iters = 200
beta2 = 0.99

device = 'cpu'
dtype = 'float32'
compile = False
window = 2                     # attend to itself and the previous token: one iteration = one more position
