#!/usr/bin/env bash
# Does thinking longer help? (README section) Prepare the multi-hop task, train the looped model and its two plain
# twins (equal parameters, equal FLOPs) on exactly the same tokens, then print accuracy by hops x test-time depth r.
#   bash run_reasoning_showcase.sh cpu    # 2 CPU cores: smaller task (hops 1..3 in training, 1..6 in test) and d=64
#   bash run_reasoning_showcase.sh gpu    # one GPU: the configs as written (hops 1..4 / 1..8, d=256)
# Results: out-reasoning-<mode>-<model>/{ckpt.pt,log.jsonl,reasoning.json}; wall times are printed per step.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-cpu}
case "$mode" in
  cpu)
    data=(--data_dir=data/cpu)
    prep=(--max_hops=3 --n_chains=2 --n_train=50000 --n_val=2000 --n_test=300)
    train=(--device=cpu --dtype=float32 --compile=False --n_embd=64 --n_head=2 --batch_size=32 --block_size=64
           --max_iters=1200 --lr_decay_iters=1200 --learning_rate=3e-3 --min_lr=3e-4 --warmup_iters=50
           --eval_interval=400 --eval_iters=2)
    eval=(--n_test=300) ;;
  gpu)
    data=()
    prep=()
    train=()
    eval=(--device=cuda) ;;
  *) echo "error: mode '$mode' is not allowed: expected cpu or gpu" >&2; exit 2 ;;
esac

timed() {  # run a command, then print its wall time
  local t0=$SECONDS; "$@"; echo "[$(( SECONDS - t0 )) s] $*"
}

timed python prepare.py reasoning "${prep[@]}" "${data[@]}"
for model in looped plain_params plain_flops; do
  out=out-reasoning-$mode-${model//_/-}
  timed python train.py config/reasoning_$model.py "${train[@]}" "${data[@]}" --out_dir=$out
done
for model in looped plain_params plain_flops; do
  out=out-reasoning-$mode-${model//_/-}
  timed python reasoning.py --ckpt=$out/ckpt.pt "${eval[@]}"
done
