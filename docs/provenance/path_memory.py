"""Session-19 check: path errors of students on two TRAINING files of teacher paths and on the two
held-out ones (docs/stage3-distill.md, "Session 19"): has a path round learnt its paths by heart?

    python docs/provenance/path_memory.py STUDENT_DIR [STUDENT_DIR ...]   (each named student-N)

Reads runs/traj (docs/provenance/traj_gen.py); prints one line a student and file: the mean squared
distance between the student's N-step DDIM sample from the path's noise and the teacher's 64-step end.
"""
import sys

import torch

from ldm.diffusion.samplers import sample_ddim
from ldm.distill.student import GuidedStudent
from ldm.pipeline import TextToImage

torch.set_num_threads(2)
pipe = TextToImage.from_folder("ldm/assets/shapes64")
for path in sys.argv[1:]:
    net = GuidedStudent.from_pretrained(path).eval()
    steps = int(path.rstrip("/").split("-")[-1])
    m = pipe.denoiser(net, pipe.index.student_prediction)
    ts = pipe.schedule.timesteps(steps).float()
    for name in ["00000.pt", "00001.pt", "00066.pt", "00067.pt"]:   # trained on / held out
        d = torch.load("runs/traj/" + name)
        cond = pipe.encode_prompts(d["prompts"])
        with torch.no_grad():
            z = sample_ddim(m, d["states"][0], ts, pipe.schedule, extra_args={**cond, "w": d["w"]}, disable=True)
        print(path, name, round((z - d["states"][-1]).pow(2).mean().item(), 4), flush=True)
