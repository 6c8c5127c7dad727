#!/bin/bash
# The format document's h5py recipe, run verbatim on a checkpoint written by 2 MPI ranks:
# every tensor of every buffer is reassembled from its pieces and compared with the values the
# C test wrote (a formula of buffer, element and step); the pure-Python CRC-32C agrees with the
# index; a damaged index CRC and a truncated shard are caught by the recipe's verify_shards.
# Needs BAM_BUILD_DIR, BAM_SOURCE_DIR, BAM_PYTHON, MPIEXEC (set by CTest).
set -u
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

build=${BAM_BUILD_DIR:?BAM_BUILD_DIR is not set}
src=${BAM_SOURCE_DIR:?BAM_SOURCE_DIR is not set}
py=${BAM_PYTHON:-/usr/bin/python3}
mpiexec=${MPIEXEC:-mpirun}
tmp=$(mktemp -d /tmp/bam-test-h5py-XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# 1. a checkpoint of step 7, 2 ranks, with moments
if BAM_CKPT_KEEP_DIR="$tmp/ckpt" "$mpiexec" -np 2 --oversubscribe --bind-to none -x BAM_CKPT_KEEP_DIR \
    "$build/tests/ckpt_test_shard" >"$tmp/write.log" 2>&1; then ok; else bad "writing the checkpoint"; cat "$tmp/write.log"; fi
step_dir="$tmp/ckpt/$(cat "$tmp/ckpt/latest" 2>/dev/null)"
[ -f "$step_dir/index.h5" ] && ok || bad "no index.h5 in '$step_dir'"

# 2. the python block after the snippet marker in docs/checkpoint-format.md
awk '/<!-- snippet: python/ {armed = 1; next}
     armed && /^```python/ {inside = 1; next}
     inside && /^```/ {exit}
     inside {print}' "$src/docs/checkpoint-format.md" >"$tmp/snippet.py"
grep -q "def read_tensor" "$tmp/snippet.py" && ok || bad "snippet not found in docs/checkpoint-format.md"

# 3. run it
cat >"$tmp/check.py" <<'EOF'
import os, shutil, sys
import numpy as np
import h5py

exec(open(sys.argv[1]).read())
step_dir, scratch = sys.argv[2], sys.argv[3]
passed = failed = 0

def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what)

with h5py.File(os.path.join(step_dir, "index.h5"), "r") as f:
    tensors = f["tensors"][:]
    step = int(f.attrs["step"])
    check(int(f.attrs["world"]) == 2 and step == 7, "world and step attributes")
buffers = ["params", "adam_m", "adam_v"]
for row in tensors:
    name, off, numel = row["name"].decode(), int(row["offset"]), int(row["numel"])
    i = np.arange(off, off + numel, dtype=np.int64)
    for b, buf in enumerate(buffers):
        want = (((i * 7 + b * 1000003 + step * 13) % 65521) * 0.125 - 4096.0).astype(np.float32)
        got = read_tensor(step_dir, name, buf)
        check(got.shape == tuple(int(d) for d in row["shape"][: row["ndim"]]), f"{name} shape {got.shape}")
        check(got.dtype == np.float32 and np.array_equal(got.ravel(), want), f"{buf}/{name} values")
check(read_tensor(step_dir, "w_up").shape == (2, 256, 64), "w_up shape")
check(read_tensor(step_dir, "wte").shape == (50, 64), "wte shape")
# the tensor split between the two shards really comes from both
with h5py.File(os.path.join(step_dir, "index.h5"), "r") as f:
    pieces = f["pieces"][:]
check(any(np.bincount(pieces["tensor"]) > 1), "no tensor is split between shards")
check(crc32c(b"123456789") == 0xE3069283, "CRC-32C check value")
try:
    verify_shards(step_dir)
    check(True, "")
except ValueError as e:
    check(False, f"verify_shards on a good checkpoint: {e}")

# a copy whose index records a wrong CRC, and one with a truncated shard
for damage in ("crc", "truncate"):
    copy = os.path.join(scratch, damage)
    shutil.copytree(step_dir, copy)
    if damage == "crc":
        with h5py.File(os.path.join(copy, "index.h5"), "r+") as f:
            rows = f["shards"][:]
            rows[1]["crc32c_adam_m"] ^= 1
            f["shards"][...] = rows
    else:
        shard = os.path.join(copy, "shard-00001-of-00002.h5")
        os.truncate(shard, os.path.getsize(shard) - 100)
    try:
        verify_shards(copy)
        check(False, f"verify_shards missed the damage '{damage}'")
    except (ValueError, OSError) as e:
        check("shard-00001-of-00002.h5" in str(e), f"verify_shards message for '{damage}': {e}")
print(f"PY {passed} {failed}")
EOF
out=$("$py" "$tmp/check.py" "$tmp/snippet.py" "$step_dir" "$tmp" 2>&1)
echo "$out" | grep -v '^PY ' || true
read -r _ p f <<<"$(echo "$out" | grep '^PY ' || echo "PY 0 1")"
pass=$((pass + p))
fail=$((fail + f))
[ "$p" -gt 0 ] && ok || bad "the python check did not run"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
