"""Guided distillation (Meng et al. 2023): the w-conditioned student, its targets and its sampler.

    student.py   GuidedStudent: a U-Net, MMDiT (SD3) or FLUX.1-dev Flux that also takes the guidance weight w
    targets.py   stage-one and stage-two targets, the truncated-SNR x-space loss, the student grid
    sampling.py  the N-step stochastic sampler (Meng sec. 4.3), core sampler signature
    paths.py     the CFG teacher's own DDIM paths as targets, and the path error
    dmd.py       distribution matching (Yin et al. 2024) of a student's whole sampler
The training story is stages/distill.py.
"""
