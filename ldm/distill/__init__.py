"""Distillation to few steps: guided (Meng et al. 2023), distribution matching, latent consistency.

    student.py   GuidedStudent: a U-Net, MMDiT (SD3) or FLUX.1-dev Flux that also takes the guidance weight w
    targets.py   stage-one and stage-two targets, the truncated-SNR x-space loss, the student grid
    paths.py     the CFG teacher's own DDIM paths as targets, and the path error
    dmd.py       distribution matching (Yin et al. 2024) of a student's whole sampler
    lcm.py       latent consistency distillation (Luo et al. 2023): grid, guided teacher step, boundary scalings
The training stories are stages/distill.py and stages/distill_lcm.py.
"""
