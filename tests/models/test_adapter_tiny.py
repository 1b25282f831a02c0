"""The timm adapter on tiny models at 32 px: fast enough to run once per mutant (``make mutation``).

One model of each kind the adapter tells apart: hierarchical CNNs (test_resnet with 5 feature_info
entries, test_convnext with exactly 4), a CNN with a ``conv_head`` (test_efficientnet), NHWC models
(test_mambaout, whose head_hidden_size 256 differs from its num_features 64, and a tiny Swin), token
models with 1 and 2 prefix tokens (test_vit, and with a register token), without prefix tokens
(test_vit_relpos, a tiny Mixer), and isotropic depths 4, 6, 7 and 8 around ``default_stages``' switch.
tests/models/test_adapter.py runs the paper models at 224 px.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer

from crossdistill.models import FINAL, default_stages, embedding_dim, forward_model, is_token_model
from crossdistill.models.adapter import ModelOutput, _supports, num_prefix_tokens

B = 2


def tiny_vit(depth: int, **kwargs) -> torch.nn.Module:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=depth, num_heads=2, num_classes=5, **kwargs)


BUILDERS = {
    "resnet": lambda: timm.create_model("test_resnet", num_classes=5),
    "convnext": lambda: timm.create_model("test_convnext", num_classes=5),
    "efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=5),
    "mambaout": lambda: timm.create_model("test_mambaout", num_classes=5),
    "swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=5,
        img_size=32,
        embed_dim=8,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        window_size=2,
    ),
    "vit": lambda: timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8),
    "vit_registers": lambda: timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8, reg_tokens=1),
    "vit_relpos": lambda: timm.create_model("test_vit_relpos", num_classes=5, img_size=32, patch_size=8),
    "vit_depth7": lambda: tiny_vit(7),
    "vit_depth8": lambda: tiny_vit(8, class_token=False, global_pool="avg"),
    "mixer": lambda: MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=5, embed_dim=16),
}
TOKEN = {"vit", "vit_registers", "vit_relpos", "vit_depth7", "vit_depth8", "mixer"}
NHWC = {"mambaout", "swin"}

# name -> (embedding width, prefix tokens, default stages)
FACTS = {
    "resnet": (96, 0, [-4, -3, -2, -1]),
    "convnext": (64, 0, [-4, -3, -2, -1]),
    "efficientnet": (256, 0, [-4, -3, -2, FINAL]),
    "mambaout": (256, 0, [-4, -3, -2, -1]),
    "swin": (64, 0, [-4, -3, -2, -1]),
    "vit": (64, 1, [2, 3, 4, 5]),
    "vit_registers": (64, 2, [2, 3, 4, 5]),
    "vit_relpos": (96, 0, [1, 3, 6, 8]),
    "vit_depth7": (16, 1, [1, 3, 4, 6]),
    "vit_depth8": (16, 0, [1, 3, 5, 7]),
    "mixer": (16, 0, [1, 2, 3, 4]),
}


class Tiny:
    """A tiny model in eval mode and a fixed input."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.name = name
        self.model = BUILDERS[name]().eval()
        self.x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        self.depth = len(self.model.feature_info)

    def forward(self, **kwargs) -> ModelOutput:
        with torch.no_grad():
            return forward_model(self.model, self.x, **kwargs)

    def module_outputs(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The output of every feature_info module, and forward_features, in a plain pass."""
        seen: dict[int, torch.Tensor] = {}
        handles = []
        for i, entry in enumerate(self.model.feature_info):

            def hook(module, inputs, output, i=i):
                seen[i] = output

            handles.append(self.model.get_submodule(entry["module"]).register_forward_hook(hook))
        try:
            with torch.no_grad():
                final = self.model.forward_features(self.x)
        finally:
            for handle in handles:
                handle.remove()
        return [seen[i] for i in range(self.depth)], final


@pytest.fixture(autouse=True)
def _few_threads():
    """One thread, overriding conftest's two: these models are so small that on a busy machine a second
    thread only waits (a test_resnet pass takes 15 ms on one thread, over a second on two)."""
    torch.set_num_threads(1)
    yield


@functools.cache
def built(name: str) -> Tiny:
    """Each model is built once for the whole file (no test changes one)."""
    return Tiny(name)


@pytest.fixture(params=list(BUILDERS))
def tiny(request) -> Tiny:
    return built(request.param)


@pytest.fixture
def models() -> dict[str, Tiny]:
    return {name: built(name) for name in ("resnet", "efficientnet", "mambaout", "vit", "vit_registers")}


def as_nchw(model: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2) if tensor.ndim == 4 and getattr(model, "output_fmt", None) == "NHWC" else tensor


# --- what the adapter reads off a model ---------------------------------------------


def test_facts(tiny):
    width, prefix, stages = FACTS[tiny.name]
    assert embedding_dim(tiny.model) == width and type(embedding_dim(tiny.model)) is int
    assert num_prefix_tokens(tiny.model) == prefix and type(num_prefix_tokens(tiny.model)) is int
    assert is_token_model(tiny.model) == (tiny.name in TOKEN)
    assert default_stages(tiny.model) == stages
    assert (getattr(tiny.model, "output_fmt", None) == "NHWC") == (tiny.name in NHWC)  # the fixture is what it says


class Stub(torch.nn.Module):
    """A module with only the attributes given."""

    def __init__(self, **attributes):
        super().__init__()
        for key, value in attributes.items():
            setattr(self, key, value)


def test_embedding_dim_prefers_head_hidden_size_and_falls_back_to_num_features():
    assert embedding_dim(Stub(head_hidden_size=256, num_features=64)) == 256
    assert embedding_dim(Stub(num_features=64)) == 64
    assert embedding_dim(Stub(head_hidden_size=None, num_features=64)) == 64
    width = embedding_dim(Stub(num_features=torch.tensor(12)))  # widths build layers and go into JSON: a plain int
    assert width == 12 and type(width) is int


@pytest.mark.parametrize("attributes", [{}, {"head_hidden_size": None, "num_features": 0}])
def test_embedding_dim_without_a_width_is_a_type_error(attributes):
    with pytest.raises(TypeError, match=r"^Stub exposes neither head_hidden_size nor num_features$"):
        embedding_dim(Stub(**attributes))


def test_num_prefix_tokens_of_models_without_the_attribute_is_zero():
    assert num_prefix_tokens(Stub()) == 0
    assert num_prefix_tokens(Stub(num_prefix_tokens=None)) == 0
    assert num_prefix_tokens(Stub(num_prefix_tokens=3)) == 3


def info(*reductions: int) -> list[dict]:
    return [{"module": f"blocks.{i}", "num_chs": 8, "reduction": r} for i, r in enumerate(reductions)]


def test_a_token_model_has_several_feature_info_entries_of_one_reduction():
    assert is_token_model(Stub(feature_info=info(16, 16)))
    assert not is_token_model(Stub(feature_info=info(16)))  # one entry: nothing says it is isotropic
    assert not is_token_model(Stub(feature_info=info(4, 8)))
    assert not is_token_model(Stub(feature_info=[]))
    assert not is_token_model(Stub(feature_info=None))
    assert not is_token_model(Stub())


def test_default_stages_of_isotropic_models_around_depth_seven():
    assert default_stages(Stub(feature_info=info(*[16] * 4))) == [0, 1, 2, 3]
    assert default_stages(Stub(feature_info=info(*[16] * 6))) == [2, 3, 4, 5]
    assert default_stages(Stub(feature_info=info(*[16] * 7))) == [1, 3, 4, 6]
    assert default_stages(Stub(feature_info=info(*[16] * 12))) == [1, 3, 9, 11]
    assert default_stages(Stub(feature_info=info(2, 4, 8, 16))) == [-4, -3, -2, -1]
    assert default_stages(Stub(feature_info=info(2, 4, 8, 16), conv_head=torch.nn.Identity())) == [-4, -3, -2, "final"]


@pytest.mark.parametrize(
    "attributes,depth",
    [
        ({}, 0),
        ({"feature_info": None}, 0),
        ({"feature_info": info(4, 8, 16)}, 3),
        ({"feature_info": info(16, 16, 16)}, 3),
    ],
)
def test_default_stages_need_four_feature_info_entries(attributes, depth):
    with pytest.raises(TypeError, match=rf"^Stub has only {depth} feature_info entries, fewer than four stages$"):
        default_stages(Stub(**attributes))


def test_supports_reads_keyword_parameters():
    def method(x, *, output_fmt="NCHW"):
        return x

    assert _supports(method, "output_fmt") and not _supports(method, "return_prefix_tokens")
    assert not _supports(object(), "output_fmt")  # no signature to read: not supported


def test_model_output_defaults():
    a, b = ModelOutput(embedding=torch.zeros(1)), ModelOutput(embedding=torch.zeros(1))
    assert a.logits is None and a.stages == [] and a.stages is not b.stages


# --- one pass: embedding and logits --------------------------------------------------


def test_plain_pass_is_timms_forward(tiny):
    model, x = tiny.model, tiny.x
    out = tiny.forward()
    with torch.no_grad():
        logits = model(x)
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
    assert out.stages == []
    assert out.embedding.shape == (B, embedding_dim(model)) and out.logits.shape == (B, 5)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.embedding, embedding)
    assert tiny.forward(logits=False).logits is None


def test_every_stage_is_its_feature_info_modules_output(tiny):
    """Stage i (positive or negative) is feature_info[i]'s module output: NCHW for maps (NHWC models
    permuted), [B, prefix + L, C] for tokens with the prefix tokens first; FINAL is forward_features."""
    modules, final = tiny.module_outputs()
    depth, prefix = tiny.depth, num_prefix_tokens(tiny.model)
    request = [*range(depth), *range(-depth, 0), FINAL]
    out = tiny.forward(stages=request)
    assert len(out.stages) == len(request)
    for stage, got in zip(request, out.stages):
        want = as_nchw(tiny.model, final if stage == FINAL else modules[stage])
        if stage != FINAL and tiny.name in TOKEN:
            assert got.ndim == 3 and got.shape[1] == want.shape[1]  # the block's own token layout, prefix first
        torch.testing.assert_close(got, want, msg=lambda m: f"{tiny.name} stage {stage}: {m}")
    if prefix:
        torch.testing.assert_close(out.stages[0][:, :prefix], modules[0][:, :prefix])


def test_the_staged_pass_gives_the_plain_embedding_and_logits(tiny):
    plain, staged = tiny.forward(), tiny.forward(stages=default_stages(tiny.model))
    torch.testing.assert_close(staged.logits, plain.logits)
    torch.testing.assert_close(staged.embedding, plain.embedding)
    assert staged.logits.shape == (B, 5) and staged.embedding.shape == (B, embedding_dim(tiny.model))


def test_stages_come_back_in_the_order_asked_with_repeats_and_aliases(models):
    resnet = models["resnet"]  # 5 feature_info entries: 3 and -2 are one stage
    single = {i: resnet.forward(stages=[i]).stages[0] for i in range(5)}
    for request in ([4, 0], [-1, -5], [3, -2, 3], [2, 2], (1, 0), [FINAL, 0, FINAL]):
        got = resnet.forward(stages=request).stages
        assert len(got) == len(request)
        for stage, tensor in zip(request, got):
            want = resnet.forward(stages=[FINAL]).stages[0] if stage == FINAL else single[stage % 5]
            torch.testing.assert_close(tensor, want)


def test_final_alone_is_the_backbone_output(models):
    for name in ("resnet", "efficientnet", "mambaout", "vit"):
        tiny = models[name]
        _, final = tiny.module_outputs()
        out = tiny.forward(stages=[FINAL])
        assert len(out.stages) == 1
        torch.testing.assert_close(out.stages[0], as_nchw(tiny.model, final))
        torch.testing.assert_close(out.logits, tiny.forward().logits)


def test_nhwc_final_maps_are_reported_nchw(models):
    mambaout = models["mambaout"]
    x = torch.randn(B, 3, 64, 64)
    with torch.no_grad():
        final = mambaout.model.forward_features(x)
        got = forward_model(mambaout.model, x, stages=[FINAL, -1]).stages
    assert final.shape == (B, 2, 2, 64)
    assert got[0].shape == got[1].shape == (B, 64, 2, 2)
    torch.testing.assert_close(got[0], final.permute(0, 3, 1, 2))


def test_one_backbone_pass(models):
    for name in ("resnet", "efficientnet", "vit_registers"):
        tiny = models[name]
        calls = []
        handle = tiny.model.get_submodule(tiny.model.pretrained_cfg["first_conv"]).register_forward_hook(
            lambda *args: calls.append(1)
        )
        try:
            for kwargs in (
                {},
                {"logits": False},
                {"stages": default_stages(tiny.model)},
                {"stages": [FINAL]},
                {"stages": [0, -1, FINAL]},
            ):
                calls.clear()
                tiny.forward(**kwargs)
                assert len(calls) == 1, (name, kwargs)
        finally:
            handle.remove()


@pytest.mark.parametrize("request_,bad", [([5], 5), ([-6], -6), ([0, 9], 9), ([FINAL, -7], -7)])
def test_out_of_range_stages(models, request_, bad):
    resnet = models["resnet"]  # 5 feature_info entries: -5 .. 4
    with pytest.raises(IndexError, match=rf"^stage index {bad} out of range for ResNet \(5 feature_info entries\)$"):
        resnet.forward(stages=request_)
    assert len(resnet.forward(stages=[4, -5]).stages) == 2


def test_stages_need_forward_intermediates():
    class NoIntermediates(torch.nn.Module):
        def forward_features(self, x):
            return x

        def forward_head(self, x, pre_logits=False):
            return x

    with pytest.raises(
        TypeError,
        match=r"^NoIntermediates has no forward_intermediates\(\); stage features need "
        r"timm >= 1.0 models$",
    ):
        forward_model(NoIntermediates(), torch.zeros(1, 3), stages=[0])
    assert forward_model(NoIntermediates(), torch.zeros(1, 3), stages=[]).stages == []


def test_gradients_reach_the_backbone_through_every_output(models):
    vit = Tiny("vit")
    vit.model.train()
    out = forward_model(vit.model, vit.x, stages=[0, FINAL])
    weights = torch.Generator().manual_seed(0)
    for tensor in (out.logits, out.embedding, *out.stages):
        vit.model.zero_grad()
        # a random weighting: a plain sum of a LayerNorm's output (the embedding) is 0 whatever the input, so its
        # gradient was rounding noise, exactly 0 on some CPUs
        (tensor * torch.randn(tensor.shape, generator=weights)).sum().backward(retain_graph=True)
        assert vit.model.patch_embed.proj.weight.grad.abs().sum() > 0
