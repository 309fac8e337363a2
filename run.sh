#!/usr/bin/env bash
# The main job, end to end on the CPU configuration: prepare -> train (~6.5 min on 2 cores) -> sample -> eval.
# Uses the TinyStories sample in ../shared/data/tinystories when it is there, else the hub.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
. .venv/bin/activate
[ -d ../shared/tiktoken-cache ] && export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$(cd ../shared/tiktoken-cache && pwd)}"
stories=../shared/data/tinystories
data="--tokenizer=bpe:4096 --bpe_dropout=0.1 --data_dir=data/sample-bpe4096"  # config/cpu.py's tokenizer and data_dir
if [ -f $stories/train-sample.txt ]; then
  echo "== prepare: local TinyStories sample in $stories"
  python prepare.py --source=$stories/train-sample.txt --val_source=$stories/valid-sample.txt $data
else
  echo "== prepare: roneneldan/TinyStories from the Hugging Face hub, first 20,000 stories"
  python prepare.py --max_docs=20000 $data
fi
echo "== train: config/cpu.py"
# run again, it carries on from out-cpu/last.pt (a finished run ends at once) rather than train over it
resume=$([ -f out-cpu/last.pt ] && echo --init_from=resume || true)
python train.py config/cpu.py $resume
echo "== sample"
python sample.py --out_dir=out-cpu --start="Once upon a time" --num_samples=3 --max_new_tokens=200
python eval.py --out_dir=out-cpu
