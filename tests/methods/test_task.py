"""Method specs (`--method` + `method_args` -> MethodSpec rows) and the composite task that sums the methods."""
import pytest
import torch

from featcache.errors import ConfigError, FeatcacheError, UnknownNameError
from featcache.methods import METHODS, DistillTask, MethodArgumentError, MethodSpec, method_specs
from featcache.methods.task import ce_loss, parse_method_spec, split_method_args


def test_parse_method_spec_weights_and_errors():
    assert parse_method_spec("vitkd+nkd") == [("vitkd", 1.0), ("nkd", 1.0)]
    assert parse_method_spec(" vitkd:1.0 + nkd:0.5 ") == [("vitkd", 1.0), ("nkd", 0.5)]
    with pytest.raises(ConfigError, match="empty method name"):
        parse_method_spec("vitkd+")
    with pytest.raises(UnknownNameError, match="unknown method 'vitdk'; known: .*vitkd"):
        parse_method_spec("vitdk")
    with pytest.raises(ConfigError, match=r"method weight 'half' of 'nkd'.*'nkd:0.5'"):
        parse_method_spec("vitkd+nkd:half")


def test_split_method_args_flat_nested_and_composite():
    assert split_method_args(["kd"], {"temperature": 4}) == {"kd": {"temperature": 4}}
    assert split_method_args(["kd"], {"kd": {"temperature": 4}}) == {"kd": {"temperature": 4}}
    assert split_method_args(["kd"], None) == {"kd": {}}
    assert split_method_args(["vitkd", "nkd"], {"nkd": {"gamma": 2}}) == {"vitkd": {}, "nkd": {"gamma": 2}}
    with pytest.raises(ConfigError, match=r"keys \['gamma'\] name no method of vitkd\+nkd.*nkd.temperature"):
        split_method_args(["vitkd", "nkd"], {"gamma": 2})
    with pytest.raises(ConfigError, match="must be a mapping"):
        split_method_args(["vitkd", "nkd"], {"nkd": 2})


def test_method_specs_resolve_classes_kwargs_and_weights():
    specs = method_specs("vitkd:2+nkd:0.5", {"nkd": {"gamma": 1.5}})
    assert specs == [MethodSpec("vitkd", METHODS.get("vitkd"), {}, 2.0),
                     MethodSpec("nkd", METHODS.get("nkd"), {"gamma": 1.5}, 0.5)]
    name, cls, kwargs, weight = specs[1]  # a plain 4-tuple for callers that unpack
    assert (name, cls.name, kwargs, weight) == ("nkd", "nkd", {"gamma": 1.5}, 0.5)
    assert method_specs("kd", {"temperature": 4}) == [MethodSpec("kd", METHODS.get("kd"), {"temperature": 4}, 1.0)]
    with pytest.raises(ConfigError, match="names a method twice"):
        method_specs("kd+kd:0.5", {})


def test_unknown_method_argument_is_a_featcache_error_and_a_type_error(ctx):
    class Forwarding(METHODS.get("ce")):
        def __init__(self, ctx, **kwargs):
            super(METHODS.get("ce"), self).__init__(ctx, **kwargs)

    with pytest.raises(MethodArgumentError, match=r"unknown arguments \['temprature'\]") as err:
        Forwarding(ctx, temprature=2)
    assert isinstance(err.value, TypeError) and isinstance(err.value, FeatcacheError)


def test_task_sums_weighted_methods_and_the_shared_label_term(ctx, batch):
    images, targets, labels = batch
    kd, nkd = METHODS.get("kd")(ctx), METHODS.get("nkd")(ctx)
    task = DistillTask(ctx.student, {"kd": (kd, 0.5), "nkd": (nkd, 2.0)}, ce_weight=0.25)
    out = task(images, targets, labels)
    want = 0.25 * out["ce"] + 0.5 * out["kd/loss"] + 2.0 * out["nkd/loss"]
    torch.testing.assert_close(out["loss"], want)
    assert task.layers == [] and not out["kd/loss"].requires_grad and out["loss"].requires_grad


def test_ce_loss_ignores_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labelled = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 0]))
    torch.testing.assert_close(ce_loss(logits, torch.tensor([0, 0, -1])), labelled)
    assert ce_loss(logits, torch.tensor([-1, -1, -1])).item() == 0.0
