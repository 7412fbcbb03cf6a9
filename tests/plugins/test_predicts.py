"""``SamPlugin.predicts``: a plugin declares whether its ``select`` gives the model's prediction.

Two plugins that declare it are refused when the plugin stack is built (before any data or forward);
the first forward stays the backstop for plugins that leave it undeclared or declare it wrongly.
Every built-in declares it, and its declaration is what its ``select`` does (driven by the registry).
"""

from __future__ import annotations

import pytest
import torch
from test_combinations import MAKE, PREDICTING, batch_for, build

from samflow.plugins import PluginConflictError, PluginError, PluginStack, SamPlugin
from samflow.plugins.registry import discover
from samflow.sam import SamOutput
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.tokens import ExtraTokens

BUILTINS = sorted(i.name for i in discover().all if i.distribution == "samflow")
#: each built-in as the experiment may configure it, with whether it then predicts
CASES = [(name, {}, name in PREDICTING) for name in BUILTINS] + [("tokens", {"predict": False}, False)]


@pytest.mark.parametrize(("name", "options", "predicts"), CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_every_builtin_declares_what_its_select_does(name, options, predicts):
    plugin = MAKE[name](**options)
    assert plugin.predicts is predicts
    module = build({name: plugin})
    for train in (True, False):  # WSI-SAM chooses another mask in training than in evaluation
        with torch.no_grad():
            out, ctx = module.train(train)(batch_for((name,)))
        assert (plugin.select(out, ctx) is not None) is predicts


def test_two_declared_predictors_are_refused_when_the_stack_is_built():
    """No SAM, no forward: the stack alone refuses them, naming both keys and classes, in one line."""
    with pytest.raises(PluginConflictError) as err:
        PluginStack({"hq": HQSam(), "extra": ExtraTokens()})
    message = str(err.value)
    assert "\n" not in message
    assert "'hq' (HQSam) and 'extra' (ExtraTokens) both give the model's prediction" in message
    assert "predict: false" in message
    PluginStack({"hq": HQSam(), "extra": ExtraTokens(predict=False)})  # one predicts: built


def test_the_defaults_follow_whether_select_is_overridden():
    class Plain(SamPlugin):
        pass

    class Chooses(SamPlugin):
        def select(self, out: SamOutput, ctx) -> torch.Tensor | None:
            return out.masks["sam"][:, :1]

    assert Plain().predicts is False  # cannot give a prediction
    assert Chooses().predicts is None  # undeclared: found out at the first forward


class Undeclared(SamPlugin):
    """A third-party plugin that gives the prediction without declaring it."""

    def select(self, out: SamOutput, ctx) -> torch.Tensor:
        return out.masks["sam"][:, :1] * 2


class DeclaredWrongly(Undeclared):
    predicts = False


def test_an_undeclared_predictor_is_refused_at_the_first_forward_naming_both():
    module = build({"hq_sam": MAKE["hq_sam"](), "third": Undeclared()})  # built: nothing declared twice
    with pytest.raises(PluginConflictError) as err, torch.no_grad():
        module.eval()(batch_for(()))
    message = str(err.value)
    assert "\n" not in message and "'hq_sam' (HQSam)" in message and "'third' (Undeclared)" in message
    assert "predicts = True" in message


def test_a_plugin_that_declares_it_does_not_predict_and_does_is_refused_at_the_first_forward():
    module = build({"third": DeclaredWrongly()})  # alone: the declaration is wrong even without a rival
    with pytest.raises(PluginError) as err, torch.no_grad():
        module.eval()(batch_for(()))
    message = str(err.value)
    assert "\n" not in message and "'third' (DeclaredWrongly)" in message
    assert "declares predicts = False" in message
