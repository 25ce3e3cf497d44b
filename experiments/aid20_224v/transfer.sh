#!/usr/bin/env bash
# How well each finished package serves the analyst's path: fine-tuned to 4 classes of its own
# on the fine-tune curve's map (experiments/finetune_curve.py: CE, frozen backbone, ~20 steps,
# 5 and 20 chips per class, seeds 0-2), scored on its separate test map (docs/RESULTS.md,
# "Fine-tuning"). The same protocol as that curve's "AID model, CE" column, with the candidate
# as the starting model (CASD_DEFAULT_MODEL). One row per package, "shipped" for today's default:
#   bash experiments/aid20_224v/transfer.sh shipped aid20-224v-ce/seed0 aid20-260v-lite2-ce/seed0
# ~1 min a package on 2 cores; runs resume (finished runs are skipped) under runs/transfer/, one
# folder per package.
set -euo pipefail
cd "$(dirname "$0")/../.."
echo "| package | 5 chips/class, tile accuracy % | 20 chips/class |"
echo "|---|---:|---:|"
for run in "$@"; do
    model=$PWD/runs/experiments/$run/model.safetensors
    [[ $run == shipped ]] && model=$PWD/resources/models/casd_aid_default.safetensors
    [[ -f $model ]] || { echo "transfer.sh: no package $model" >&2; exit 2; }
    work=runs/transfer/${run//\//-}
    figure=(--figure "$work/curve.png")  # not the fine-tune curve's own figure in docs/
    CASD_DEFAULT_MODEL=$model .venv/bin/python experiments/finetune_curve.py --work "$work" --inits default \
        --methods ce --sizes 5 20 --seeds 0 1 2 "${figure[@]}" > "$work.log" 2>&1 ||
        { echo "transfer.sh: failed, see $work.log" >&2; exit 1; }
    # the report's "AID model, CE" cells (mean ± std over the seeds) for N = 5 and 20
    cells=$(.venv/bin/python experiments/finetune_curve.py --work "$work" --report "${figure[@]}" |
            awk -F' *\\| *' '/^$/ {exit} $2 == 5 || $2 == 20 {print $3}' | paste -sd'|')
    echo "| $run | ${cells//|/ | } |"
done
