# The CPU demo, spelled out: `python train.py` with no arguments runs exactly these values (they are train.py's
# defaults; tests/test_train.py checks that the two agree). Copy this file to start your own CPU experiment.
#   python train.py config/train_shakespeare_char_cpu.py

out_dir = 'out'
eval_interval = 250
eval_iters = 10
log_interval = 10

dataset = 'shakespeare_char'
batch_size = 32
block_size = 64

n_embd = 128
n_head = 4
n_prelude = 1
n_loop = 1
n_coda = 1
mean_depth = 4
max_depth = 8
backprop_depth = 4
dropout = 0.0

learning_rate = 2e-3
max_iters = 1500
lr_decay_iters = 0    # = max_iters
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100

device = 'cpu'
dtype = 'float32'
compile = False
