#!/usr/bin/env bash
# Vendor the JavaScript the built book needs, so that the HTML works offline (no CDN):
#   MathJax (es5 tex-chtml.js + fonts + lazily loaded extensions), RequireJS and the ipywidgets
#   embed manager (@jupyter-widgets/html-manager's embed-amd.js, which bundles
#   @jupyter-widgets/base, controls and output).
# Versions are pinned in tools/js/package.json and tools/js/package-lock.json; this script runs
# `npm ci` there (node_modules stays in tools/js/, git-ignored) and copies only what the pages load
# into _vendor/_static/vendor/ (git-ignored). _config.yml puts _vendor/ on Sphinx's html_extra_path,
# so the files land in _build/html/_static/vendor/.
# (Not the repository-root _static/: Jupyter Book 1.x adds every *.js under it to EVERY page.)
# Called by tools/setup_env.sh. Idempotent: returns at once when the copy matches the lock file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JS="$ROOT/tools/js"
DEST="$ROOT/_vendor/_static/vendor"
STAMP="$DEST/VERSIONS.txt"

want="lock $(cat "$JS/package-lock.json" "$JS/widgets-offline.js" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && grep -qxF "$want" "$STAMP" && [ -f "$DEST/mathjax/tex-chtml.js" ] \
   && [ -f "$DEST/requirejs/require.js" ] && [ -f "$DEST/html-manager/embed-amd.js" ] \
   && [ -f "$DEST/html-manager/widgets-offline.js" ]; then
  exit 0
fi

if ! command -v npm >/dev/null; then
  echo "[setup] ERROR: npm not found. The book serves MathJax and the ipywidgets JavaScript locally" >&2
  echo "[setup]        (tools/js/package-lock.json). Install Node.js and npm (Debian: apt-get install npm)" >&2
  echo "[setup]        and run: bash tools/vendor_js.sh   (until then the -W book build fails)" >&2
  exit 1
fi

echo "[setup] npm ci in tools/js and copy MathJax, RequireJS and the widget embed manager to _vendor/"
log="$(mktemp)"
if ! (cd "$JS" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"

NM="$JS/node_modules"
tmp="$ROOT/_vendor/_static/.vendor.tmp"
rm -rf "$tmp"; mkdir -p "$tmp"

# MathJax 3, es5 build: the tex-chtml component, its CHTML woff fonts, and what it may load lazily
# (TeX extensions via autoload/\require, the menu's accessibility and speech options).
mj="$NM/mathjax/es5"
mkdir -p "$tmp/mathjax/output/chtml/fonts" "$tmp/mathjax/input/tex"
cp "$mj/tex-chtml.js" "$tmp/mathjax/"
cp -r "$mj/output/chtml/fonts/woff-v2" "$tmp/mathjax/output/chtml/fonts/"
cp -r "$mj/input/tex/extensions" "$tmp/mathjax/input/tex/"
cp -r "$mj/a11y" "$mj/ui" "$mj/sre" "$tmp/mathjax/"
cp "$NM/mathjax/LICENSE" "$tmp/mathjax/"

# RequireJS (the embed manager loads its modules through it).
mkdir -p "$tmp/requirejs"
cp "$NM/requirejs/require.js" "$tmp/requirejs/"
[ -f "$NM/requirejs/LICENSE" ] && cp "$NM/requirejs/LICENSE" "$tmp/requirejs/"

# The ipywidgets embed manager and the font files its bundled CSS refers to (same folder).
hm="$NM/@jupyter-widgets/html-manager"
mkdir -p "$tmp/html-manager"
cp "$hm/dist/embed-amd.js" "$tmp/html-manager/"
find "$hm/dist" -maxdepth 1 -type f \( -name '*.woff' -o -name '*.woff2' -o -name '*.ttf' -o -name '*.eot' -o -name '*.svg' \) \
  -exec cp {} "$tmp/html-manager/" \;
[ -f "$hm/LICENSE" ] && cp "$hm/LICENSE" "$tmp/html-manager/"
# Ours (committed): loaded before embed-amd.js; sets its assets path and a MathJax 2 -> 3 shim.
cp "$JS/widgets-offline.js" "$tmp/html-manager/"

{
  echo "Vendored by tools/vendor_js.sh from tools/js/package-lock.json; served instead of CDNs."
  for p in mathjax requirejs @jupyter-widgets/html-manager; do
    node -e "const p=require(process.argv[1]); console.log(p.name + '@' + p.version)" "$NM/$p/package.json"
  done
  echo "$want"
} >"$tmp/VERSIONS.txt"

rm -rf "$DEST"
mv "$tmp" "$DEST"
echo "[setup] vendored: $(grep '@' "$DEST/VERSIONS.txt" | paste -sd' ')"
