"""MSDNet structure (docs/method.md §1), staged execution, GE gradients (docs/method.md §2), compile/bf16 friendliness."""
import pytest
import torch
import torch.nn.functional as F

import imta_fast.models.msdnet as msdnet_mod
from imta_fast.models import create_model, list_models, model_config
from tests.helpers import assert_compiled_step_matches_eager


@pytest.mark.parametrize("step,widths", [(4, [384, 384, 352, 304, 560]), (6, [512, 544, 496, 880, 792]),
                                         (7, [576, 640, 608, 528, 976])])
def test_imagenet_head_widths_match_imta_logits_channels(step, widths):
    assert create_model(f"msdnet_imagenet_step{step}").feature_dims == widths


def test_cifar_anytime_channel_plan():
    model = create_model("msdnet_cifar_anytime")
    head_inputs = [h.features[0][0].in_channels for h in model.heads]
    assert head_inputs == [160, 208, 140, 188, 236, 152, 200]  # docs/method.md §1.7 table
    assert model.feature_dims == [128] * 7
    assert [len([m for m in b if isinstance(m, msdnet_mod.MSDLayer)]) for b in model.blocks] == [4, 2, 2, 2, 2, 2, 2]


def test_lin_grow_layers_and_prune_min():
    assert model_config("msdnet_cifar_budget").layers_per_block() == [1, 2, 3, 4, 5]
    cfg = model_config("msdnet_cifar_anytime", prune="min")
    plan = msdnet_mod.layer_plan(cfg)
    flat = [s for b in plan for s in b]
    assert [s.index for s in flat if s.transition] == [5, 10]  # floor(16/3), floor(32/3)
    assert [s.out_scales for s in flat][-3:] == [3, 2, 1]  # scales drop only in the last S-1 layers
    out, _ = msdnet_mod.MSDNet(cfg)(torch.randn(2, 3, 32, 32))
    assert len(out) == 7


def test_imagenet_stem_has_bias_and_default_init():
    model = create_model("msdnet_imagenet_step4")
    assert model.stem.scales[0][0].bias is not None
    bn = model.stem.scales[0][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_all_named_configs_build():
    assert {"msdnet_imagenet_step4", "msdnet_cifar_anytime", "msdnet_cifar_budget", "msdnet_mnist", "msdnet_tiny"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


def test_forward_shapes_and_staged_execution_match():
    torch.manual_seed(0)
    model = create_model("msdnet_mnist").eval()
    x = torch.randn(3, 1, 28, 28)
    logits, feats = model(x)
    assert [tuple(t.shape) for t in logits] == [(3, 10)] * 4
    assert [t.shape[1] for t in feats] == model.feature_dims
    state = model.forward_stem(x)
    for k in range(model.num_exits):
        state, lk = model.forward_stage(k, state)
        torch.testing.assert_close(lk, logits[k], rtol=0, atol=0)


def _capture_splits(monkeypatch):
    captured = []
    original = msdnet_mod.gradient_equilibrium_split

    def spy(h, s_head, s_next, impl="auto"):
        head_in, next_in = original(h, s_head, s_next, impl=impl)
        captured.append((h, head_in, next_in, s_head, s_next))
        return head_in, next_in

    monkeypatch.setattr(msdnet_mod, "gradient_equilibrium_split", spy)
    return captured


def test_ge_gradient_matches_spec_formula(monkeypatch):
    """dL/dh_k = 1/(K-k) * g_head + (K-k-1)/(K-k) * g_next on each block's coarsest output."""
    torch.manual_seed(1)
    model = create_model("msdnet_tiny", gradient_equilibrium=True)
    captured = _capture_splits(monkeypatch)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    logits, _ = model(x)
    loss = sum(F.cross_entropy(z, y) for z in logits)
    K = model.num_exits
    assert len(captured) == K - 1  # the last block has nothing after it
    for k, (h, head_in, next_in, s_head, s_next) in enumerate(captured):
        assert s_head == pytest.approx(1 / (K - k)) and s_next == pytest.approx((K - k - 1) / (K - k))
        assert head_in.data_ptr() == h.data_ptr() == next_in.data_ptr()  # identity forward, no copy
        g_h, g_head, g_next = torch.autograd.grad(loss, [h, head_in, next_in], retain_graph=True)
        torch.testing.assert_close(g_h, s_head * g_head + s_next * g_next, rtol=1e-5, atol=1e-7)
        assert g_head.abs().sum() > 0 and g_next.abs().sum() > 0


def test_ge_leaves_head_and_last_block_gradients_unscaled():
    torch.manual_seed(2)
    plain = create_model("msdnet_tiny")
    ge = create_model("msdnet_tiny", gradient_equilibrium=True)
    ge.load_state_dict(plain.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for m in (plain, ge):
        logits, _ = m(x)
        sum(F.cross_entropy(z, y) for z in logits).backward()
    # Heads get the full gradient of their own loss; the last block sees only the last exit (scale 1).
    for name in ["heads.0.linear.weight", "heads.1.features.0.0.weight", f"blocks.{ge.num_exits - 1}.0.units.0.conv_normal.0.0.weight"]:
        torch.testing.assert_close(dict(ge.named_parameters())[name].grad, dict(plain.named_parameters())[name].grad)
    # ...while the first block's gradient is rescaled.
    g_plain = plain.blocks[0][0].units[-1].conv_normal[0][0].weight.grad
    g_ge = ge.blocks[0][0].units[-1].conv_normal[0][0].weight.grad
    assert not torch.allclose(g_plain, g_ge)


@pytest.mark.slow
def test_compile_fullgraph_training_step_with_ge():
    torch.manual_seed(3)
    model = create_model("msdnet_tiny", gradient_equilibrium=True)
    assert_compiled_step_matches_eager(model, torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))


@pytest.mark.slow
def test_inductor_compile_matches_eager_in_eval():
    torch.manual_seed(4)
    model = create_model("msdnet_tiny").eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        ref, _ = model(x)
        out, _ = compiled(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(5)
    model = create_model("msdnet_mnist").eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref, _ = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = model_cl(x.to(memory_format=torch.channels_last))
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 5e-2, rel
