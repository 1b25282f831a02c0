"""The timm adapter: embedding width, one backbone pass, and OFA-style stage features.

Every model the RSD/OFA papers use is built from its real definition (pretrained=False)
and run once at 224 px with batch 2; each model is built once for this module.
"""

from __future__ import annotations

import random

import pytest
import timm
import torch

import crossdistill  # noqa: F401  (registers swin_pico / swin_nano with timm)
from crossdistill.models import FINAL, default_stages, embedding_dim, forward_model, is_token_model

B = 2

# name -> (pre-logits width, stage shapes without the batch dim at 224 px), as in
# reference/paper_facts.md section 3.1 (OFA's stage_info). Token models give
# [tokens, C] with the class token first; hierarchical models give [C, H, W].
PAPER_MODELS = {
    "resnet18": (512, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]),
    "mobilenetv2_100": (1280, [(24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7)]),
    "deit_tiny_patch16_224": (192, [(197, 192)] * 4),
    "swin_tiny_patch4_window7_224": (768, [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]),
    "convnext_tiny": (768, [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]),
    "resmlp_12_224": (384, [(196, 384)] * 4),
    "vit_small_patch16_224": (384, [(197, 384)] * 4),
    "mixer_b16_224": (768, [(196, 768)] * 4),
    "resnet50": (2048, [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]),
    "swin_pico_patch4_window7_224": (384, [(48, 56, 56), (96, 28, 28), (192, 14, 14), (384, 7, 7)]),
    "swin_nano_patch4_window7_224": (512, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]),
}
TOKEN_MODELS = {"deit_tiny_patch16_224", "resmlp_12_224", "vit_small_patch16_224", "mixer_b16_224"}
DEFAULT_STAGES = {
    **{name: [-4, -3, -2, -1] for name in PAPER_MODELS},
    **{name: [1, 3, 9, 11] for name in TOKEN_MODELS},
    "mobilenetv2_100": [-4, -3, -2, FINAL],
}


class Paper:
    """One paper model in eval mode, a fixed input and its two reference passes."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.name = name
        self.model = timm.create_model(name, pretrained=False).eval()
        self.x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        self.stages = default_stages(self.model)
        with torch.no_grad():
            self.plain = forward_model(self.model, self.x)
            self.staged = forward_model(self.model, self.x, stages=self.stages)


@pytest.fixture(scope="module", params=list(PAPER_MODELS))
def paper(request) -> Paper:
    return Paper(request.param)


def count_backbone_passes(model: torch.nn.Module):
    """A hook on the stem (timm's ``first_conv``), which runs exactly once per backbone pass."""
    calls = [0]
    stem = model.get_submodule(model.pretrained_cfg["first_conv"])

    def hook(module, inputs, output):
        calls[0] += 1

    return calls, stem.register_forward_hook(hook)


def module_outputs(model: torch.nn.Module, names: list[str]):
    """Forward hooks that record the output of each named submodule."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module, inputs, output, name=name):
            seen[name] = output

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return seen, handles


# --- widths ---------------------------------------------------------------------------


def test_embedding_width(paper):
    width, _ = PAPER_MODELS[paper.name]
    assert embedding_dim(paper.model) == width
    assert paper.plain.embedding.shape == (B, width)
    assert paper.staged.embedding.shape == (B, width)
    assert paper.plain.logits.shape == (B, 1000)


@pytest.mark.parametrize(
    "name,params", [("swin_pico_patch4_window7_224", 5.51e6), ("swin_nano_patch4_window7_224", 9.60e6)]
)
def test_custom_swin_parameter_counts(name, params):
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.005, count
    assert model.patch_embed.proj.kernel_size == (4, 4)
    assert [len(layer.blocks) for layer in model.layers] == [2, 2, 2, 2]
    assert [layer.blocks[0].attn.num_heads for layer in model.layers] == [2, 4, 8, 16]
    assert model.layers[0].blocks[0].window_size == (7, 7)


def test_custom_swin_kwargs_and_classes():
    model = timm.create_model("swin_nano_patch4_window7_224", pretrained=False, num_classes=100)
    assert model.head.fc.out_features == 100
    assert model.pretrained_cfg["classifier"] == "head.fc"


# --- one pass -------------------------------------------------------------------------


def test_one_backbone_pass(paper):
    calls, handle = count_backbone_passes(paper.model)
    try:
        with torch.no_grad():
            out = forward_model(paper.model, paper.x)
            assert calls[0] == 1
            assert out.logits is not None and out.embedding is not None
            forward_model(paper.model, paper.x, stages=paper.stages)
            assert calls[0] == 2
            forward_model(paper.model, paper.x, stages=[FINAL])
            assert calls[0] == 3
            forward_model(paper.model, paper.x, logits=False)
            assert calls[0] == 4
    finally:
        handle.remove()


def test_matches_plain_timm(paper):
    model, x = paper.model, paper.x
    with torch.no_grad():
        logits = model(x)
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(paper.plain.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paper.plain.embedding, embedding, atol=1e-5, rtol=1e-5)


def test_logits_optional():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    x = torch.randn(B, 3, 32, 32)
    out = forward_model(model, x, logits=False)
    assert out.logits is None and out.stages == []
    assert out.embedding.shape == (B, embedding_dim(model))


def test_gradients_flow_through_the_single_pass():
    model = timm.create_model("test_vit2", pretrained=False, num_classes=5, img_size=32).train()
    out = forward_model(model, torch.randn(B, 3, 32, 32), stages=default_stages(model))
    loss = out.logits.sum() + out.embedding.sum() + sum(s.sum() for s in out.stages)
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None


# --- stages ---------------------------------------------------------------------------


def test_default_stages_and_token_models(paper):
    assert paper.stages == DEFAULT_STAGES[paper.name]
    assert is_token_model(paper.model) == (paper.name in TOKEN_MODELS)


def test_stage_shapes(paper):
    _, shapes = PAPER_MODELS[paper.name]
    assert [tuple(s.shape) for s in paper.staged.stages] == [(B, *shape) for shape in shapes]


def test_stage_pass_equals_plain_pass(paper):
    torch.testing.assert_close(paper.staged.logits, paper.plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paper.staged.embedding, paper.plain.embedding, atol=1e-5, rtol=1e-5)


def test_stage_values_are_the_feature_info_modules_outputs(paper):
    """Stage i is the output of feature_info's module (CLS token first for ViT/DeiT; NCHW for Swin);
    ``FINAL`` (MobileNetV2's stage 4) is the backbone's final map, conv_head + bn2."""
    model, info = paper.model, paper.model.feature_info
    names = [info[s]["module"] for s in paper.stages if s != FINAL]
    seen, handles = module_outputs(model, names)
    try:
        with torch.no_grad():
            final = model.forward_features(paper.x)
    finally:
        for handle in handles:
            handle.remove()
    for stage, got in zip(paper.stages, paper.staged.stages):
        want = final if stage == FINAL else seen[info[stage]["module"]]
        if want.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
            want = want.permute(0, 3, 1, 2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{paper.name} stage {stage}: {m}")
    prefix = getattr(model, "num_prefix_tokens", 0)
    if prefix:
        block = seen[info[paper.stages[0]]["module"]]
        # the class token is first, as OFA's TokenFilter expects
        torch.testing.assert_close(paper.staged.stages[0][:, 0], block[:, 0])
        torch.testing.assert_close(paper.staged.stages[0][:, 1:], block[:, prefix:])


def test_stages_in_requested_order(paper):
    stages = paper.stages
    rng = random.Random(paper.name)
    orders = [list(reversed(range(4))), [2, 0, 3, 1]]
    orders.append(rng.sample(range(4), 4))
    with torch.no_grad():
        for order in orders:
            request = [stages[i] for i in order]
            out = forward_model(paper.model, paper.x, stages=request)
            assert len(out.stages) == len(request)
            for i, got in zip(order, out.stages):
                torch.testing.assert_close(got, paper.staged.stages[i], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(out.embedding, paper.plain.embedding, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("resnet18", {}, 64),
        ("test_vit", {"img_size": 32}, 32),
        ("swin_pico_patch4_window7_224", {"img_size": 112}, 112),
        ("mixer_b16_224", {"img_size": 64}, 64),
    ],
)
def test_mixed_sign_indices_and_subsets(name, kwargs, size):
    """Positive and negative indices address the same stages, in the order requested."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(B, 3, size, size)
    depth = len(model.feature_info)
    with torch.no_grad():
        everything = forward_model(model, x, stages=list(range(depth))).stages
        for request in ([-1, 0], [1, -2], [depth - 1, -depth], [-2]):
            got = forward_model(model, x, stages=request).stages
            assert len(got) == len(request)
            for index, tensor in zip(request, got):
                torch.testing.assert_close(tensor, everything[index % depth])


# Aliases: resnet18's feature_info has 5 entries, so 3 and -2 are one stage.
@pytest.mark.parametrize(
    "name,kwargs,size,request_",
    [
        ("resnet18", {}, 64, [-1, -1]),
        ("resnet18", {}, 64, [3, -2]),
        ("resnet18", {}, 64, [-2, 3, -1]),
        ("test_vit", {"img_size": 32}, 32, [1, 3, 3, 5]),
    ],
)
def test_repeated_stage_requests(name, kwargs, size, request_):
    """Regression: repeated/aliased indices used to come back as None and shift the other stages."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(B, 3, size, size)
    request = request_ or default_stages(model)
    with torch.no_grad():
        got = forward_model(model, x, stages=request).stages
        assert len(got) == len(request)
        for index, tensor in zip(request, got):
            assert isinstance(tensor, torch.Tensor), f"stage {index} of {request} is {tensor!r}"
            torch.testing.assert_close(tensor, forward_model(model, x, stages=[index]).stages[0])


@pytest.mark.parametrize("request_", [[5], [-6], [0, 9]])
def test_out_of_range_stage(request_):
    model = timm.create_model("resnet18", pretrained=False).eval()  # 5 feature_info entries
    with pytest.raises(IndexError, match="out of range"):
        forward_model(model, torch.randn(B, 3, 64, 64), stages=request_)


def test_default_stages_are_distinct_for_shallow_token_models():
    from crossdistill.models import default_stages

    assert default_stages(timm.create_model("test_vit", img_size=32)) == [2, 3, 4, 5]  # 6 blocks
    assert default_stages(timm.create_model("vit_tiny_patch16_224", depth=4, img_size=32)) == [0, 1, 2, 3]
    assert default_stages(timm.create_model("vit_tiny_patch16_224", depth=7, img_size=32)) == [1, 3, 4, 6]
    assert default_stages(timm.create_model("deit_tiny_patch16_224", img_size=32)) == [1, 3, 9, 11]
