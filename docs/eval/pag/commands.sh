#!/bin/sh
# Perturbed-attention guidance (--pag) on the shipped teacher: the first 100 of the report's held-out prompts (--n 100:
# the same prompts and per-batch seeds as the first 100 of the shipped 500-prompt report), 64 DDIM steps, with plain
# CFG at w = 2 rerun on them as the baseline for `compare` and FD at the same N. The three reports ran side by side,
# one thread each, on the 2-core CPU shared with other jobs (load average near 20); each one's wall and CPU time go
# to docs/eval/pag/times.txt. Run from the repository root.
run() {  # name, then report flags
    name=$1; shift
    OMP_NUM_THREADS=1 /usr/bin/time -a -o docs/eval/pag/times.txt -f "$name: %e s wall, %U s user, %S s sys" \
        .venv/bin/python -m ldm.eval report --model ldm/assets/shapes64 --n 100 --teacher-steps 64 "$@" \
        --out-dir docs/eval/pag/$name > docs/eval/pag/$name.log 2>&1
}
run cfg-w2 --ws 2 --student-steps 4 --student-sweep 0 &
run pag-w2-s3-up1 --ws 2 --pag 3 --pag-layers up.1 &
run pag-w0-s3-up1 --guidance 0 --ws 0 --pag 3 --pag-layers up.1 &
wait

# Then (after the three above had shown s = 3 on up.1 far too strong), two more side by side, the same way:
#   run pag-w2-s3-mid --ws 2 --pag 3 --pag-layers mid &     (the default layers)
#   run pag-w2-s1-up1 --ws 2 --pag 1 --pag-layers up.1 &
# and the interleaved timing: OMP_NUM_THREADS=1 python docs/eval/pag/timing.py 5
