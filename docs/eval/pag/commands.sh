#!/bin/sh
# Perturbed-attention guidance (--pag) on the shipped teacher: 500 held-out prompts, 64 DDIM steps, per-batch seeds,
# paired with the shipped report (docs/eval/shapes64: plain CFG at w = 2, and the w = 0 row of its sweep).
# Run from the repository root; the two reports ran side by side (2-core CPU shared with other jobs); each one's
# wall and CPU time go to docs/eval/pag/times.txt.
run() {  # name, then report flags
    name=$1; shift
    /usr/bin/time -a -o docs/eval/pag/times.txt -f "$name: %e s wall, %U s user, %S s sys" \
        .venv/bin/python -m ldm.eval report --model ldm/assets/shapes64 --teacher-steps 64 "$@" \
        --out-dir docs/eval/pag/$name > docs/eval/pag/$name.log 2>&1
}
run w2-s3-up1 --ws 2 --pag 3 --pag-layers up.1 &
run w0-s3-up1 --guidance 0 --ws 0 --pag 3 --pag-layers up.1 &
wait
