#!/usr/bin/env bash
# README command 1: install, then run the whole pipeline on CPU (its demo stage fetches the corpus once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/llmpipe run "$@"
echo
.venv/bin/llmpipe status
echo
echo "Samples from the model (models/pretrain/samples.txt, last eval):"
sed -n '/=== step/h; /=== step/!H; ${x;p}' models/pretrain/samples.txt
for stage in sft dpo; do
  echo "Chat replies after $stage (models/$stage/samples.txt: the first block is the model it started from):"
  sed -n '/=== step/h; /=== step/!H; ${x;p}' "models/$stage/samples.txt"
done
echo
echo "Quantized and exported (models/quantized/report.md; Hugging Face: models/export/hf; llama.cpp: models/export/gguf):"
sed -n '/^| variant/,/^$/p' models/quantized/report.md
echo
echo "Registered (models/package/registered.json; the model card: models/package/README.md). Promoting it:"
.venv/bin/llmpipe promote || echo "(not promoted: the rules above say why; see the promote section of params.yaml)"
echo
.venv/bin/llmpipe models
echo
echo "Next: 'source .venv/bin/activate', then"
echo "  llmpipe chat --model models:/llmpipe-chat@production        # talk to the production version"
echo "  mlflow models serve -m models:/llmpipe-chat@production --env-manager local -p 5001   # an HTTP endpoint:"
echo "  curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\"
echo "       -d '{\"dataframe_records\": [{\"prompt\": \"ROMEO:\"}], \"params\": {\"max_new_tokens\": 40}}'"
echo "  dvc metrics show; dvc plots show; mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"
