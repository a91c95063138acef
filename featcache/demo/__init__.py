"""``featcache demo``: the whole two-stage pipeline on scikit-learn's handwritten digits, no download needed.

1. digits (:mod:`.digits`): the 1,797 real 8x8 digits, upsampled to 32 px RGB PNGs, split (seeded, stratified)
   into train/, heldout/ (10 % of train: where the baseline's learning rate is chosen) and test/.
2. teacher (:mod:`.teacher`): a small ViT (timm ``vit_tiny_patch16_224`` with 4 blocks, width 96, patch 8) trained
   here on train/; saved as ``teacher.safetensors`` and reused by later demos.
3. extract + sweep (:mod:`.runs`): the teacher runs ONCE over several views of every train image; then students
   (3 blocks, width 48, 5x fewer forward FLOPs) are all trained from that one cache with 5 labels per class, each
   for ``--seeds`` seeds: a labelled-only CE baseline with as many steps (its lr chosen on heldout/), KD, NKD,
   ViTKD, ViTKD+NKD, KD with the teacher online on fresh views every epoch, WeCoLoRA (the teacher's every 2nd
   block + LoRA, label-free) and, with ``online_kd``, KD with the teacher online on the cached views.
4. timing (:mod:`.timing`): KD from the cache and with the teacher online, one at a time with the same threads,
   against the ideal speedup (teacher forward + student step) / student step; the two students must be identical.
5. report (:mod:`.results`, :mod:`.plot`): the table (mean and range over seeds), the figure and a verdict computed
   from the measured numbers.
"""
from .config import MODEL, DemoConfig
from .digits import digits_arrays, write_digits
from .pipeline import Stopwatch, run_demo
from .results import Seeded, beats, verdict
from .runs import BASELINE, demo_runs, demo_spec, seeded_runs
from .teacher import ensure_teacher, evaluate, train_teacher
from .timing import forward_flops, model_flops

__all__ = ["BASELINE", "MODEL", "DemoConfig", "Seeded", "Stopwatch", "beats", "demo_runs", "demo_spec",
           "digits_arrays", "ensure_teacher", "evaluate", "forward_flops", "model_flops", "run_demo", "seeded_runs",
           "train_teacher", "verdict", "write_digits"]
