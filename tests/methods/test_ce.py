"""The CE-only baseline method: no teacher target, no loss of its own; the task's label CE is all that trains."""
import torch

from featcache.methods import DistillTask
from featcache.methods.task import ce_loss
from featcache.methods.ce import CE



def test_ce_baseline_is_the_label_cross_entropy(ctx, manifest, batch):
    images, _, labels = batch
    assert CE.required_targets(manifest) == [] and CE.default_ce_weight == 1.0
    method = CE(ctx)
    task = DistillTask(ctx.student, {"ce": (method, 1.0)}, ce_weight=1.0, label_smoothing=0.1)
    out = task(images, {}, labels)  # no targets at all
    assert float(out["ce/loss"]) == 0.0
    expected = ce_loss(ctx.student(images), labels, label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], expected)
    assert sum(p.numel() for p in method.parameters()) == 0

