# Source this file: fetches NVRTC (CUDA C -> PTX, no GPU or toolkit needed) from PyPI into
# .nvrtc/ once, and puts it on LD_LIBRARY_PATH so dynn's kernel-compile test runs.
#   source scripts/nvrtc-env.sh
_dynn_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_dynn_nvrtc="$_dynn_root/.nvrtc"
if ! ls "$_dynn_nvrtc"/lib/libnvrtc.so.* >/dev/null 2>&1; then
    rm -rf "$_dynn_nvrtc"
    mkdir -p "$_dynn_nvrtc/lib"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "$_dynn_nvrtc/wheel" "nvidia-cuda-nvrtc-cu12==12.9.86"
    python3 - "$_dynn_nvrtc" <<'PY'
import glob, os, shutil, sys, zipfile
root = sys.argv[1]
wheel = glob.glob(os.path.join(root, "wheel", "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if "/lib/" in name and ".so" in name:
            with z.open(name) as src, open(os.path.join(root, "lib", os.path.basename(name)), "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
fi
export LD_LIBRARY_PATH="$_dynn_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _dynn_root _dynn_nvrtc
