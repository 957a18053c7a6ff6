"""Guided distillation (Meng et al. 2023): the w-conditioned student, its targets and its sampler.

    student.py   GuidedStudent: a U-Net that also takes the guidance weight w
    targets.py   stage-one and stage-two targets, the truncated-SNR x-space loss, the student grid
    sampling.py  the N-step stochastic sampler (Meng sec. 4.3), core sampler signature
The training story is stages/distill.py.
"""
