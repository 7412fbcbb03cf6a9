"""A third-party plugin's mistakes are named: the plugin key, its class, the hook, and what was expected.

Wrong shapes or None returned from a hook, a misspelt hook name, an error in ``setup``, a loss no
plugin parameter reaches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_batch
from torch import nn

from samflow.module import ModelConfigError, SamflowModule, SamSpec
from samflow.plugins import PluginConfigError, PluginError, PluginStack, SamPlugin
from samflow.sam import HookedSam


class PermutedBlockOutput(SamPlugin):
    def block_output(self, i, x, ctx):
        return x.permute(0, 3, 1, 2)  # (B, C, h, w)


class DoubledChannels(SamPlugin):
    def block_output(self, i, x, ctx):
        return torch.cat([x, x], -1)


class NoneBlockOutput(SamPlugin):
    def block_output(self, i, x, ctx):
        x.mul(2)  # forgets to return


class DropsImages(SamPlugin):
    def block_input(self, i, x, ctx):
        return x[:1]


class PromptChannels(SamPlugin):
    def prompts(self, prompts, ctx):
        return dataclasses.replace(prompts, sparse=prompts.sparse[..., :-1])


class DenseSize(SamPlugin):
    def prompts(self, prompts, ctx):
        return dataclasses.replace(prompts, dense=prompts.dense[..., :-1])


class NonePrompts(SamPlugin):
    def prompts(self, prompts, ctx):
        return None


class SelectAll(SamPlugin):
    def select(self, out, ctx):
        return out.masks["sam"]  # (N, 4, h, w): all of SAM's masks, not one


@pytest.mark.parametrize(
    ("plugin", "hook", "got", "expected"),
    [
        (PermutedBlockOutput(), "block_output(i=0)", "a tensor of shape (2, 64, 8, 8)", "(2, 8, 8, 64)"),
        (DoubledChannels(), "block_output(i=0)", "a tensor of shape (2, 8, 8, 128)", "(2, 8, 8, 64)"),
        (NoneBlockOutput(), "block_output(i=0)", "'NoneType'", "(2, 8, 8, 64)"),
        (DropsImages(), "block_input(i=0)", "a tensor of shape (1, 8, 8, 64)", "(2, 8, 8, 64)"),
        (PromptChannels(), "prompts: sparse", "a tensor of shape (2, 2, 63)", "(2, K, 64)"),
        (DenseSize(), "prompts: dense", "a tensor of shape (2, 64, 8, 7)", "(2, 64, 8, 8)"),
        (NonePrompts(), "prompts", "'NoneType'", "PromptEmbeddings"),
        (SelectAll(), "select", "a tensor of shape (2, 4, 32, 32)", "(2, 1, 32, 32)"),
    ],
)
def test_a_hook_returning_a_wrong_shape_or_none_names_the_plugin(tiny_sam, plugin, hook, got, expected):
    hooked = HookedSam(tiny_sam, PluginStack({"mine": plugin}))
    with pytest.raises(PluginError) as err, torch.no_grad():
        hooked(random_batch(2))
    message = str(err.value)
    assert f"Plugin 'mine' ({type(plugin).__name__}): {hook} returned {got}, expected" in message
    assert expected in message and "\n" not in message


class MisspeltOutput(SamPlugin):
    def setup(self, sam):
        self.scale = nn.Parameter(torch.ones(64))

    def block_ouput(self, i, x, ctx):
        return x * self.scale


class MisspeltPrompts(SamPlugin):
    def prompt(self, prompts, ctx):
        return prompts


class HelperNamedLikeAHook(SamPlugin):
    """SamAdapter's ``prompt(i, features)``: a close name with other arguments is a helper."""

    def prompt(self, i, features):
        return features

    def block_output(self, i, x, ctx):
        return x + self.prompt(i, x)


@pytest.mark.parametrize(
    ("plugin", "method", "hook"),
    [(MisspeltOutput(), "block_ouput", "block_output"), (MisspeltPrompts(), "prompt", "prompts")],
)
def test_a_misspelt_hook_is_refused_when_attached(tiny_sam, plugin, method, hook):
    with pytest.raises(PluginError) as err:
        HookedSam(tiny_sam, PluginStack({"typo": plugin}))
    message = str(err.value)
    assert f"model.plugins.typo ({type(plugin).__name__}): method {method!r}" in message
    assert f"hook {hook!r}" in message and f"rename it to {hook!r}" in message


def test_a_helper_named_like_a_hook_with_other_arguments_passes(tiny_sam):
    HookedSam(tiny_sam, PluginStack({"helper": HelperNamedLikeAHook()}))


class BadSetup(SamPlugin):
    def setup(self, sam):
        sam.image_encoder.patch_embed.projection  # noqa: B018 - SAM names it proj


def test_an_error_in_setup_names_the_plugin(tiny_sam):
    with pytest.raises(
        PluginError, match=r"^model\.plugins\.bad \(BadSetup\): setup: AttributeError: .*projection"
    ):
        HookedSam(tiny_sam, PluginStack({"bad": BadSetup()}))


class RefusesItsOptions(SamPlugin):
    def setup(self, sam):
        raise PluginConfigError(f"Plugin {self.key!r} (refuses): block 99 does not exist; give 0..1.")


class NamesItsKeyInAValueError(SamPlugin):
    def setup(self, sam):
        raise ValueError(f"Plugin {self.key!r}: something")


def test_a_plugin_config_error_reaches_the_user_as_it_is_any_other_error_is_wrapped(tiny_sam):
    with pytest.raises(
        PluginConfigError, match=r"^Plugin 'mine' \(refuses\): block 99 does not exist; give 0..1.$"
    ):
        HookedSam(tiny_sam, PluginStack({"mine": RefusesItsOptions()}))
    # the key in the message is no longer what decides: only the error's type
    with pytest.raises(
        PluginError,
        match=r"^model\.plugins\.mine \(NamesItsKeyInAValueError\): setup: ValueError: Plugin 'mine'",
    ):
        HookedSam(tiny_sam, PluginStack({"mine": NamesItsKeyInAValueError()}))


def test_the_built_in_plugins_refuse_options_with_plugin_config_errors(tiny_sam):
    from samflow_plugins.lora import LoRA

    with pytest.raises(PluginConfigError, match=r"^Plugin 'lo' \(lora\): block\(s\) \[99\] do not exist"):
        HookedSam(tiny_sam, PluginStack({"lo": LoRA(blocks=[99])}))


class UnusedParameter(SamPlugin):
    """Owns a parameter that no hook uses: nothing it trains reaches the loss."""

    def setup(self, sam):
        self.scale = nn.Parameter(torch.ones(64))

    def block_ouptut_scaled(self, i, x):  # a helper, never called
        return x * self.scale


def test_a_loss_no_trainable_parameter_reaches_is_one_line_listing_the_plugins():
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"lost": UnusedParameter()})
    with pytest.raises(ModelConfigError) as err:
        module.training_step(random_batch(2), 0)
    message = str(err.value)
    assert "no trainable parameter reached the loss" in message
    assert "lost (UnusedParameter): setup" in message and "\n" not in message


def test_a_checkpoint_of_the_same_plugins_with_other_options_names_each_shape():
    from samflow.sam.build import CheckpointError
    from samflow_plugins.tokens import ExtraTokens

    trained = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"tokens": ExtraTokens(num_tokens=2)})
    here = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"tokens": ExtraTokens()})
    with pytest.raises(CheckpointError) as err:
        here.load_state_dict(trained.state_dict())
    message = str(err.value)
    assert "model.plugins.tokens.tokens.weight (2, 64) in the checkpoint, (1, 64) here" in message
    assert "--experiment <run>/config.yaml" in message and "\n" not in message


def test_non_finite_predictions_recommend_an_accepted_action_and_name_the_plugins(capsys):
    import re

    from samflow.callbacks.finite import NonFiniteError
    from samflow.cli import main
    from samflow_plugins.tokens import ExtraTokens

    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"tok": ExtraTokens()})
    module._tally("val", 0).update(2, None, 2, torch.tensor(2))
    with pytest.raises(NonFiniteError) as err:
        module._finish("val")
    message = str(err.value)
    assert "a plugin produces non-finite values (plugins: tok)" in message
    action = re.search(r"--non_finite\.action (\w+)", message)
    assert action is not None and action.group(1) == "error"
    with pytest.raises(SystemExit) as parsed:  # the recommended value parses: the config is printed
        main(["fit", "--experiment", "quickstart", "--non_finite.action", action.group(1), "--print_config"])
    assert parsed.value.code == 0
    assert "action: error" in capsys.readouterr().out
