# ETD recipe (METHOD.md §4), after step 1 (config/etd_base_shakespeare_char.py) and the conversion: etd.py splits
# the plain GPT into prelude / loop / coda at the knees of its angular-distance curve, keeping every weight, and
# writes out-etd/ckpt.pt. This mid-trains it on the same data with the same optimizer settings (train.py's defaults)
# while the loop block runs r times.
#   python train.py config/etd_base_shakespeare_char.py             # step 1: the plain base
#   python etd.py --init_from=out-etd-base --out_dir=out-etd         # step 2: convert (prints the curve)
#   python train.py config/etd_midtrain_shakespeare_char.py         # step 3: mid-train
#   python etd.py --init_from=out-etd-base --after=out-etd-mid --eval_depths=1,2,4,8   # the table
# The architecture (split, width, inject='none', s_0 = e) comes from the checkpoint; only depth settings are set here.

init_from = 'out-etd/ckpt.pt'  # the converted model of step 2
out_dir = 'out-etd-mid'
sample_tokens = 0
max_iters = 500

# depth: random r with E[r] = mean_depth + 1, capped at max_depth (our extension; ETD itself trains one fixed k:
# --fixed_depth=True --mean_depth=2 --max_depth=2). Backprop through every iteration: with inject='none' a truncated
# loop would cut the prelude's gradient (METHOD.md §3 trap).
mean_depth = 2
max_depth = 6
backprop_depth = 6

device = 'cpu'
dtype = 'float32'
compile = False
