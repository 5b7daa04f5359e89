#!/usr/bin/env bash
# Build the self-contained meshcni CNI plugin: a PyInstaller one-dir bundle at dist/meshcni-cni/ whose
# executable `meshcni` runs on a node with no Python at all (install-cni copies the directory to the CNI
# bin dir). One-dir rather than one-file because one-file unpacks itself to /tmp on every exec, which is
# most of its startup; no UPX (decompression costs more than it saves); every module the plugin does not
# import is excluded so the bundle stays small. Installs PyInstaller into the venv (the `build` extra).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MESHCNI_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
OUT="$ROOT/dist/meshcni-cni"
WORK="$ROOT/build/meshcni-cni"

log() { printf '[build-plugin] %s\n' "$*" >&2; }

if [ ! -x "$PY" ]; then
  echo "no venv at $VENV; run scripts/setup.sh first" >&2
  exit 1
fi
if ! "$PY" -c 'import PyInstaller' 2>/dev/null; then
  log "installing pyinstaller into $VENV"
  "$VENV/bin/pip" install -q 'pyinstaller>=6.0'
fi

# Modules the plugin never imports but that the venv offers (system site packages included): listing them
# keeps PyInstaller from following optional imports into them.
# meshcni.datapath.iptables, meshcni.sys and meshcni.config stay in: failurePolicy "iptables" writes
# Istio's rules from the plugin itself (imported only on that path, so a normal ADD never loads them).
EXCLUDES=(grpc google pyroute2 bcc click psutil prometheus_client meshcni.agent meshcni.cli meshcni.datapath.ebpf
          meshcni.install meshcni.lab meshcni.proxy meshcni.handoff meshcni.preflight
          tkinter unittest pydoc doctest asyncio multiprocessing concurrent xml xmlrpc sqlite3 lib2to3
          distutils setuptools pkg_resources ssl _ssl bz2 lzma curses readline pdb
          argparse pprint)
args=()
for m in "${EXCLUDES[@]}"; do args+=(--exclude-module "$m"); done

rm -rf "$WORK"
mkdir -p "$WORK" "$ROOT/dist"
log "building $OUT"
"$PY" -m PyInstaller \
  --noconfirm --clean --log-level WARN \
  --onedir --noupx --console \
  --name meshcni \
  --paths "$ROOT" \
  --distpath "$WORK/dist" --workpath "$WORK/work" --specpath "$WORK" \
  "${args[@]}" \
  "$ROOT/meshcni/cni/__main__.py"

rm -rf "$OUT"
mv "$WORK/dist/meshcni" "$OUT"

# Smoke test with an empty environment, as a runtime on a Python-less node would run it.
reply="$(printf '{"cniVersion":"1.0.0"}' | env -i CNI_COMMAND=VERSION "$OUT/meshcni")"
case "$reply" in
  *'"supportedVersions"'*) ;;
  *) echo "bundle smoke test failed: $reply" >&2; exit 1 ;;
esac
log "ok: $OUT/meshcni ($(du -sh "$OUT" | cut -f1)); VERSION → $reply"
