"""IMTA stage-2 network: ISC recurrence (docs/method.md §3), teacher, detach flag, frozen backbone, BN mode."""
import pytest
import torch
import torch.nn.functional as F

from imta_fast.flops import count_exit_costs
from imta_fast.models import create_imta_model, create_model


def _net(**kw):
    torch.manual_seed(0)
    return create_imta_model(create_model("msdnet_tiny", gradient_equilibrium=True), **kw)


def test_shapes_and_isc_recurrence_by_hand():
    net = _net().eval()
    x = torch.randn(3, 3, 16, 16)
    logits, teacher = net(x)
    assert [tuple(z.shape) for z in logits] == [(3, 10)] * 3 and teacher.shape == (3, 10)
    _, feats = net.backbone(x)
    z1 = net.classifiers[0](feats[0])
    z2 = net.classifiers[1](torch.cat([feats[1], F.relu(net.isc[0][1](net.isc[0][0](z1)))], 1))
    torch.testing.assert_close(logits[0], z1)
    torch.testing.assert_close(logits[1], z2)
    ge_logits, _ = net.backbone(x)
    torch.testing.assert_close(teacher, ge_logits[-1])
    assert not teacher.requires_grad


def test_new_head_widths():
    net = create_imta_model(create_model("msdnet_imagenet_step4"))
    assert [c.in_features for c in net.classifiers] == [384, 768, 704, 608, 1120]
    assert [m[0].out_features for m in net.isc] == [384, 352, 304, 560]


def test_backbone_frozen_and_isc_gradient_flows_back_unless_detached():
    for detach, expect_grad in [(False, True), (True, False)]:
        net = _net(isc_detach=detach).train()
        logits, _ = net(torch.randn(4, 3, 16, 16))
        F.cross_entropy(logits[-1], torch.randint(0, 10, (4,))).backward()
        assert all(p.grad is None for p in net.backbone.parameters())
        g = net.classifiers[0].weight.grad
        assert (g is not None and g.abs().sum() > 0) == expect_grad


@pytest.mark.parametrize("bn_mode,changes", [("train", True), ("eval", False)])
def test_backbone_bn_mode(bn_mode, changes):
    net = _net(backbone_bn=bn_mode).train()
    before = net.backbone.stem.scales[0][1].running_mean.clone()
    net(torch.randn(4, 3, 16, 16) + 3)
    after = net.backbone.stem.scales[0][1].running_mean
    assert (not torch.equal(before, after)) == changes
    assert net.isc[0][1].training  # the new heads always train


def test_staged_execution_matches_forward_and_costs_count_new_heads():
    net = _net().eval()
    x = torch.randn(2, 3, 16, 16)
    logits, _ = net(x)
    state = net.forward_stem(x)
    for k in range(net.num_exits):
        state, z = net.forward_stage(k, state)
        torch.testing.assert_close(z, logits[k], rtol=0, atol=0)
    base = count_exit_costs(net.backbone, (3, 16, 16))
    imta = count_exit_costs(net, (3, 16, 16))
    new_params = sum(p.numel() for p in list(net.classifiers.parameters()) + list(net.isc.parameters()))
    ge_linears = sum(p.numel() for h in net.backbone.heads for p in h.linear.parameters())
    assert imta.params[-1] == base.params[-1] + new_params - ge_linears  # GE Linears skipped at inference


@pytest.mark.parametrize("backbone_bn", ["train", "eval"])
def test_frozen_backbone_keeps_no_graph_and_matches_a_grad_enabled_backbone(backbone_bn):
    """Stage 2 runs the backbone without autograd; logits, BN statistics and head gradients are
    bit-identical to running it with autograd on, and the graph holds only head/ISC nodes."""
    import copy

    net = _net(backbone_bn=backbone_bn).train()
    twin = copy.deepcopy(net)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    logits, teacher = net(x)
    # the twin: the same recurrence with the backbone under autograd (what the code did before)
    xs, prior, ref = twin.backbone.forward_stem(x), None, []
    for k in range(twin.num_exits):
        xs, head_in = twin.backbone.forward_block(k, xs)
        if k == twin.num_exits - 1:
            ref_teacher, feat = twin.backbone.heads[k](head_in)
        else:
            feat = twin.backbone.heads[k].features(head_in).flatten(1)
        prior = twin._new_logits(k, feat, prior)
        ref.append(prior)
    for a, b in zip(logits, ref):
        assert torch.equal(a, b)
    assert torch.equal(teacher, ref_teacher)
    sum(F.cross_entropy(z, y) for z in logits).backward()
    sum(F.cross_entropy(z, y) for z in ref).backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(net.backbone.named_buffers(), twin.backbone.buffers()):
        assert torch.equal(b, c), name
    assert all(p.grad is None for p in net.backbone.parameters())
