#!/usr/bin/env bash
# The grading recipe end to end on a labels CSV with grades 0-4, each step the stage a user runs:
# make-datalist (5 folds grouped by the CSV's group column, 0.2 inner test) -> build-lmdb -> every fold of
# grading_lite0 trained once per head -> per head: predict (hv flips) the inner test and out of fold, evaluate
# out of fold (guarded cut-point search) and the inner test (default and searched cuts) -> the three ensembles
# on both -> the expectation head's inner test with none / two-crop / ten-crop TTA, timed. Writes OUT/times.txt,
# OUT/peak_rss.txt (each training and prediction process's peak RSS) and the eval_* folders (metrics.json each).
#   bash benchmarks/grading_recipe.sh ../shared/data/stas_tiles_public/labels.csv grade /tmp/grade 224 3
set -euo pipefail
LABELS=$1 COLUMN=$2 D=$3 SIZE=${4:-224} EPOCHS=${5:-3}
cd "$(dirname "$0")/.."
S=.venv/bin/stas
peak() { /usr/bin/time -a -o "$D/peak_rss.txt" -f "%M KiB $1" "${@:2}"; }  # peak RSS of one step
mkdir -p "$D"
$S make-datalist --labels-csv "$LABELS" --label-column "$COLUMN" --classes 0 1 2 3 4 --folds 5 --test-fraction 0.2 \
    --seed 0 --out "$D/datalist.json"
$S build-lmdb --datalist "$D/datalist.json" --out "$D/cache_$SIZE" --bundle grading_lite0 --image-size "$SIZE" \
    --lists training test --no-progress
for head in regression cumulative expectation; do
  start=$(date +%s)
  for fold in 0 1 2 3 4; do
    peak "train $head fold $fold" .venv/bin/python -m monai.bundle run training \
        --config_file bundles/grading_lite0.json --dataset_dir "$D" --datalist "$D/datalist.json" \
        --cache_dir "$D/cache_$SIZE" --image_size "$SIZE" --epochs "$EPOCHS" --batch_size 32 \
        --lr 0.001 --device cpu --num_workers 0 --channels_last true --head $head --fold $fold \
        --output_dir "$D/runs_$head" > "$D/train_${head}_$fold.log" 2>&1
  done
  echo "$head $(( $(date +%s) - start )) s" >> "$D/times.txt"
done
for head in regression cumulative expectation; do
  C=$(ls "$D"/runs_$head/grading_lite0/fold*/best.pt)
  $S predict --checkpoint $C --datalist "$D/datalist.json" --tta hv --batch-size 32 --workers 0 --overwrite \
      --out "$D/test_$head.csv"
  peak "predict $head out of fold" $S predict --checkpoint $C --datalist "$D/datalist.json" --tta hv \
      --batch-size 32 --workers 0 --overwrite --out-of-fold --out "$D/oof_$head.csv"
  $S evaluate --predictions "$D/oof_$head.csv" --datalist "$D/datalist.json" --section training --overwrite \
      --out "$D/eval_oof_$head"
  $S evaluate --predictions "$D/test_$head.csv" --datalist "$D/datalist.json" --overwrite \
      --cuts "$D/eval_oof_$head/cut_points.json" --out "$D/eval_test_$head"
done
T="$D/test_regression.csv $D/test_cumulative.csv $D/test_expectation.csv"
O="$D/oof_regression.csv $D/oof_cumulative.csv $D/oof_expectation.csv"
K="$D/eval_oof_regression/cut_points.json $D/eval_oof_cumulative/cut_points.json $D/eval_oof_expectation/cut_points.json"
for m in mean label-average scaled-average; do
  extra=""
  [ $m != mean ] && extra="--member-cuts $K"
  $S ensemble $O --method $m $extra --overwrite --out "$D/oof_ens_$m.csv"
  $S evaluate --predictions "$D/oof_ens_$m.csv" --datalist "$D/datalist.json" --section training --overwrite \
      --out "$D/eval_oof_ens_$m"
  $S ensemble $T --method $m $extra --overwrite --out "$D/test_ens_$m.csv"
  $S evaluate --predictions "$D/test_ens_$m.csv" --datalist "$D/datalist.json" --overwrite \
      --cuts "$D/eval_oof_ens_$m/cut_points.json" --out "$D/eval_test_ens_$m"
done
C=$(ls "$D"/runs_expectation/grading_lite0/fold*/best.pt)
for tta in none two-crop ten-crop; do
  t0=$(date +%s)
  $S predict --checkpoint $C --datalist "$D/datalist.json" --tta $tta --batch-size 32 --workers 0 --overwrite \
      --out "$D/test_expectation_$tta.csv"
  echo "tta $tta $(( $(date +%s) - t0 )) s" >> "$D/times.txt"
  $S evaluate --predictions "$D/test_expectation_$tta.csv" --datalist "$D/datalist.json" --overwrite \
      --cuts "$D/eval_oof_expectation/cut_points.json" --out "$D/eval_test_expectation_$tta"
done
