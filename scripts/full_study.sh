#!/usr/bin/env bash
# The full-scale study of docs/results.md (issue 12): MiniLM-L6 on all of tweets-binary and 20,000
# snli-binary pairs, MPNet-base on 4,000 tweets-binary examples. One `layerexit compare` per row
# group, run one after another with one thread each; every compare resumes an interrupted run and
# reuses a finished one, so the script can be stopped (kill) and started again at any time. Each step
# writes a compare folder of its own (scripts/study.py pools the folders of a task), so a step can run
# on another machine or day than the seeds it is compared with.
#
#   bash scripts/full_study.sh STEP...     # steps below, e.g. `tb-pabee0 tb-lam0.2`; `all` for every step
#   OUT=runs/full bash scripts/full_study.sh all
#
# The mpnet-* steps need the encoder first: `python -m layerexit.assets install mpnet-base` (`make assets` skips it).
# Then `python scripts/results.py collect ...` copies each finished run's small reports into studies/results/
# (`collect-run` for the retrofit steps, into studies/results/recipe/).
set -euo pipefail
OUT=${OUT:-runs/full}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
LAM=${LAM:-0.1}             # the lambda chosen on tweets-binary dev at seed 0 (tb-lam*: 0.1), also MPNet's
SNLI_LAM=${SNLI_LAM:-0.5}   # the one chosen on snli-binary dev at seed 0 (snli-lam*: 0.5): see docs/results.md
MINILM=(--model minilm-l6 --epochs 2 --batch-size 32 --max-length 64 --threads "$THREADS" --data-seed 0 --quiet)
TB=(--task tweets-binary "${MINILM[@]}")                                # all 18,120 / 2,299 / 2,323
SNLI=(--task snli-binary --max-train 20000 "${MINILM[@]}")             # full dev and test (9,824)
MPNET=(--model mpnet-base --task tweets-binary --epochs 2 --batch-size 32 --max-length 64 --threads "$THREADS"
       --data-seed 0 --max-train 4000 --max-eval 1000 --quiet)

cmp() { local out=$1; shift; echo "== $(date -u +%FT%TZ) $out $*"; "$PY" -m layerexit.cli compare --output "$OUT/$out" "$@"; }

# retrofit NAME FINETUNED_RUN ARGS: exits on the frozen encoder of a plain fine-tuned run (its last exit kept),
# then the speed-up certified at <= 1% disagreement with it, 90% confidence, on dev (issue 27). Minutes, not
# resumable: an unfinished folder is started again.
retro() {
  local out=$OUT/$1 from=$2; shift 2
  echo "== $(date -u +%FT%TZ) ${out#"$OUT"/} from $from $*"
  [ -f "$from/eval/report.json" ] || { echo "$from has not finished: run its finetune step first" >&2; return 1; }
  if [ ! -f "$out/eval/report.json" ]; then
    rm -rf "$out"
    "$PY" -m layerexit.cli retrofit "$from" --output "$out" "$@"
  fi
  "$PY" -m layerexit.cli calibrate "$out" --max-drop 0.01 --confidence 0.9 --loss disagreement --quiet
}
# the plain fine-tuned run of a seed, as the finetune steps write it
finetuned() { echo "$OUT/$1-finetune$([ "$2" = 0 ] || echo "-seeds$2")/finetune-seed$2"; }
RETRO=(--max-length 64 --threads "$THREADS" --data-seed 0 --quiet)

step() {
  case $1 in
    tb-pabee0)   cmp tweets-binary-minilm --methods pabee --seeds 0 "${TB[@]}" ;;
    tb-lam0.1)   cmp tweets-binary-minilm-lam0.1 --methods ensemble --lambda 0.1 --weighting linear --seeds 0 "${TB[@]}" ;;
    tb-lam0.2)   cmp tweets-binary-minilm-lam0.2 --methods ensemble --lambda 0.2 --weighting linear --seeds 0 "${TB[@]}" ;;
    tb-lam0.5)   cmp tweets-binary-minilm-lam0.5 --methods ensemble --lambda 0.5 --weighting linear --seeds 0 "${TB[@]}" ;;
    tb-finetune) cmp tweets-binary-minilm-finetune --methods finetune --seeds 0 "${TB[@]}" ;;
    tb-finetune1|tb-finetune2)   # the fine-tuned references of seeds 1 and 2 (issue 27), one seed per folder
                 cmp "tweets-binary-minilm-finetune-seeds${1#tb-finetune}" --methods finetune --seeds "${1#tb-finetune}" "${TB[@]}" ;;
    tb-pabee12)  cmp tweets-binary-minilm-seeds12 --methods pabee --seeds 1 2 "${TB[@]}" ;;
    tb-ours12)   cmp "tweets-binary-minilm-lam$LAM-seeds12" --methods ensemble --lambda "$LAM" --weighting linear --seeds 1 2 "${TB[@]}" ;;
    tb-uniform)  cmp "tweets-binary-minilm-uniform-lam$LAM" --methods ensemble --lambda "$LAM" --weighting uniform --seeds 0 "${TB[@]}" ;;
    tb-onelr)    # the defaults' measurements on dev (seed 0, the chosen lambda): one learning rate for encoder and exits,
                 cmp "tweets-binary-minilm-lam$LAM-onelr" --methods ensemble --lambda "$LAM" --weighting linear --head-lr 5e-5 \
                     --seeds 0 "${TB[@]}" ;;
    tb-epochs3)  # ... and a third epoch (every other run trains 2)
                 cmp "tweets-binary-minilm-lam$LAM-epochs3" --methods ensemble --lambda "$LAM" --weighting linear --seeds 0 \
                     "${TB[@]}" --epochs 3 ;;
    tb-baselines) cmp tweets-binary-minilm-baselines --methods deebert,fastbert --seeds 0 "${TB[@]}" ;;
    tb-deebert|tb-fastbert)   # the baselines one per folder, to run side by side, from tb-finetune's run
                 cmp "tweets-binary-minilm-${1#tb-}" --methods "${1#tb-}" --seeds 0 "${TB[@]}" \
                     --finetune-from "$OUT/tweets-binary-minilm-finetune" ;;
    tb-jointdistill|tb-jointdistill-alt)   # issue 27: joint training from the fine-tuned run, every exit distilled
                 # towards it (gradient equilibrium; -alt: BERxiT's alternating steps), then certified against it
                 local alt=(); [ "$1" = tb-jointdistill-alt ] && alt=(--alternate)
                 cmp "tweets-binary-minilm-${1#tb-}" --methods joint-distill --seeds 0 "${TB[@]}" "${alt[@]}" \
                     --finetune-from "$OUT/tweets-binary-minilm-finetune"
                 "$PY" -m layerexit.cli calibrate "$OUT/tweets-binary-minilm-${1#tb-}/joint-distill-seed0" --max-drop 0.01 \
                     --confidence 0.9 --loss disagreement --reference "$(finetuned tweets-binary-minilm 0)" --quiet ;;
    snli-pabee0) cmp snli-binary-minilm --methods pabee --seeds 0 "${SNLI[@]}" ;;
    snli-pabee12) cmp snli-binary-minilm-seeds12 --methods pabee --seeds 1 2 "${SNLI[@]}" ;;
    snli-pabee1|snli-pabee2)   # one seed per folder: a run that fits in what is left of a session
                 cmp "snli-binary-minilm-seeds${1#snli-pabee}" --methods pabee --seeds "${1#snli-pabee}" "${SNLI[@]}" ;;
    snli-pabee)  step snli-pabee0; step snli-pabee12 ;;
    snli-lam0.1|snli-lam0.2|snli-lam0.5)
                 cmp "snli-binary-minilm-${1#snli-}" --methods ensemble --lambda "${1#snli-lam}" --weighting linear --seeds 0 "${SNLI[@]}" ;;
    snli-lam)    for l in 0.1 0.2 0.5; do step "snli-lam$l"; done ;;
    snli-deebert|snli-fastbert)   # from snli-finetune's run
                 cmp "snli-binary-minilm-${1#snli-}" --methods "${1#snli-}" --seeds 0 "${SNLI[@]}" \
                     --finetune-from "$OUT/snli-binary-minilm-finetune" ;;
    snli-finetune) cmp snli-binary-minilm-finetune --methods finetune --seeds 0 "${SNLI[@]}" ;;
    snli-finetune1|snli-finetune2)   # the fine-tuned references of seeds 1 and 2 (issue 27)
                 cmp "snli-binary-minilm-finetune-seeds${1#snli-finetune}" --methods finetune --seeds "${1#snli-finetune}" \
                     "${SNLI[@]}" ;;
    snli-ours12) cmp "snli-binary-minilm-lam$SNLI_LAM-seeds12" --methods ensemble --lambda "$SNLI_LAM" --weighting linear \
                     --seeds 1 2 "${SNLI[@]}" ;;
    snli-ours1|snli-ours2)
                 cmp "snli-binary-minilm-lam$SNLI_LAM-seeds${1#snli-ours}" --methods ensemble --lambda "$SNLI_LAM" --weighting linear \
                     --seeds "${1#snli-ours}" "${SNLI[@]}" ;;
    mpnet-pabee0) cmp tweets-binary-mpnet --methods pabee --seeds 0 "${MPNET[@]}" ;;
    mpnet-pabee1) cmp tweets-binary-mpnet-seeds1 --methods pabee --seeds 1 "${MPNET[@]}" ;;
    mpnet-ours0|mpnet-ours1)   # one seed per folder, like snli-ours1/2: two MPNet runs at a time fit in a session
                 local seed=${1#mpnet-ours}; cmp "tweets-binary-mpnet-lam$LAM$([ "$seed" = 0 ] || echo "-seeds$seed")" --methods ensemble \
                     --lambda "$LAM" --weighting linear --seeds "$seed" "${MPNET[@]}" ;;
    mpnet)       for s in mpnet-pabee0 mpnet-ours0 mpnet-pabee1 mpnet-ours1; do step "$s"; done ;;
    mpnet-finetune0|mpnet-finetune1)
                 local seed=${1#mpnet-finetune}; cmp "tweets-binary-mpnet-finetune$([ "$seed" = 0 ] || echo "-seeds$seed")" \
                     --methods finetune --seeds "$seed" "${MPNET[@]}" ;;
    mpnet-deebert|mpnet-fastbert)   # from mpnet-finetune0's run
                 cmp "tweets-binary-mpnet-${1#mpnet-}" --methods "${1#mpnet-}" --seeds 0 "${MPNET[@]}" \
                     --finetune-from "$OUT/tweets-binary-mpnet-finetune" ;;
    tb-retrofit[0-2])   # issue 27: exits for the fine-tuned references, trained on the same texts
                 local seed=${1#tb-retrofit}; retro "tweets-binary-minilm-retrofit-seed$seed" \
                     "$(finetuned tweets-binary-minilm "$seed")" --task tweets-binary --seed "$seed" "${RETRO[@]}" ;;
    snli-retrofit[0-2])
                 local seed=${1#snli-retrofit}; retro "snli-binary-minilm-retrofit-seed$seed" \
                     "$(finetuned snli-binary-minilm "$seed")" --task snli-binary --max-train 20000 --seed "$seed" "${RETRO[@]}" ;;
    mpnet-retrofit[0-1])
                 local seed=${1#mpnet-retrofit}; retro "tweets-binary-mpnet-retrofit-seed$seed" \
                     "$(finetuned tweets-binary-mpnet "$seed")" --task tweets-binary --max-train 4000 --max-eval 1000 \
                     --seed "$seed" "${RETRO[@]}" ;;
    mpnet-retrofit-all[0-1])   # the same fine-tuned model (4,000 labelled tweets); its exits distilled on all
                 # 18,120 training tweets, labels unused: the unlabelled text a service has (issue 27)
                 local seed=${1#mpnet-retrofit-all}; retro "tweets-binary-mpnet-retrofit-alltrain-seed$seed" \
                     "$(finetuned tweets-binary-mpnet "$seed")" --task tweets-binary --max-eval 1000 \
                     --seed "$seed" "${RETRO[@]}" ;;
    recipe)      # the folders studies/results/recipe/ were collected from (the joint runs, PABEE and the paper's
                 # objective, are the full-scale study's steps run again to keep their answers)
         for s in tb-retrofit0 tb-retrofit1 tb-retrofit2 snli-retrofit0 snli-retrofit1 snli-retrofit2 \
                  mpnet-retrofit0 mpnet-retrofit1 mpnet-retrofit-all0 mpnet-retrofit-all1 tb-pabee0 tb-lam0.1 tb-jointdistill \
                  tb-jointdistill-alt; do step "$s"; done ;;
    all) # the folders studies/results/full-* were collected from
         for s in tb-pabee0 tb-lam0.1 tb-lam0.2 tb-lam0.5 tb-finetune tb-pabee12 tb-ours12 tb-uniform snli-pabee0 \
                  snli-pabee1 snli-pabee2 snli-lam snli-finetune snli-ours1 snli-ours2 mpnet tb-deebert tb-fastbert \
                  snli-deebert snli-fastbert tb-onelr mpnet-finetune0 mpnet-finetune1 tb-finetune1 snli-finetune1 tb-finetune2 snli-finetune2; do step "$s"; done ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}
for s in "$@"; do step "$s"; done
