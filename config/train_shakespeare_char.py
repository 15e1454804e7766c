# One GPU: a ~11M-parameter looped model on shakespeare_char, nanoGPT's shakespeare_char scale.
#   python train.py config/train_shakespeare_char.py
# 2 prelude + 2 loop x r + 2 coda layers of width 384 (nanoGPT's 6-layer baby GPT, with the middle two looped).
# At mean depth 4 a token passes 12 layers, so a step costs about twice nanoGPT's (~3 min on an A100 for 5000 steps).
# Not measured yet: no GPU was available when this file was written.

out_dir = 'out-shakespeare-char'
eval_interval = 500   # evaluation at 4 depths + adaptive exit costs ~100 training steps here: not too often
eval_iters = 20
always_save_checkpoint = False  # the model overfits this small corpus: keep the best val checkpoint

batch_size = 64
block_size = 256      # context of up to 256 previous characters

n_embd = 384
n_head = 6
n_prelude = 2
n_loop = 2
n_coda = 2
mean_depth = 4
max_depth = 16
backprop_depth = 4
dropout = 0.2

learning_rate = 1e-3  # with baby networks a bit higher is fine
max_iters = 5000
lr_decay_iters = 5000  # usually = max_iters
min_lr = 1e-4         # learning_rate / 10
beta2 = 0.99          # a bit higher because the number of tokens per step is small

sample_tokens = 500
