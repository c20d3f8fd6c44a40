"""RANet (docs/method.md §12): structure, staged execution and state compaction, GE rule, compile/bf16,
IMTA on top, and train.py end to end on a tiny configuration."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from imta_fast.models import RANet, RANetConfig, create_imta_model, create_model, list_models, model_config
from imta_fast.models.ranet import block_plan
from tests.helpers import assert_compiled_step_matches_eager

RANET_NAMES = ["ranet_cifar", "ranet_cifar_lg", "ranet_imagenet", "ranet_imagenet_c32", "ranet_mnist", "ranet_tiny"]


def test_named_configs_registered_and_build_with_any_class_count():
    assert set(RANET_NAMES) <= set(list_models())
    for name in RANET_NAMES:
        with torch.device("meta"):
            net = create_model(name, num_classes=7, in_channels=2)
        assert isinstance(net, RANet) and net.cfg.num_classes == 7
        assert net.stem.layers[0][0].in_channels == 2
        assert all(h.linear.out_features == 7 for h in net.heads)
    with torch.device("meta"):
        assert create_model("msdnet_tiny").__class__.__name__ == "MSDNet"  # MSDNet names unchanged


def test_cifar_script_plan_by_hand():
    """train_cifar.sh: 4 sub-networks (8/16/32/32 px), 2/4/6/8 blocks, 8 exits (docs/method.md §12)."""
    plan = block_plan(model_config("ranet_cifar"))
    assert [len(b) for b in plan] == [2, 4, 6, 8]
    assert [[b.index for b in blocks if b.exit] for blocks in plan] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # stride-2 last layers: block numbers (1-based) in the last s-1 entries of [0, 2, 4, 6][:i+1]
    assert [[b.index for b in blocks if b.down] for blocks in plan] == [[], [1], [1, 3], [3, 5]]
    # transitions at floor(m * B / s): none / 2 / 2,4 / 2,5 (1-based)
    assert [[b.index for b in blocks if b.transition] for blocks in plan] == [[], [1], [1, 3], [1, 4]]
    s0 = plan[0]
    assert (s0[0].c_in, s0[0].growth, s0[0].c_out, s0[1].c_out) == (64, 24, 160, 256)
    b = plan[1][0]  # first fusion block of sub-network 1: 32 + 4*12 = 80, + floor(80/4) = 100
    assert (b.c_in, b.growth, b.c_low, b.c_out) == (32, 12, (64, 88, 112, 136, 160), 100)
    b = plan[1][1]  # 100 + 48 = 148, + 37 = 185, transition floor(92.5) = 92
    assert (b.c_in, b.c_out, b.down, b.transition) == (100, 92, True, True)
    lg = block_plan(model_config("ranet_cifar_lg"))
    assert [b.n_layers for b in lg[2]] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("size", [28, 32])
def test_resolutions_and_fusion_layer_split(size):
    net = create_model("ranet_tiny").eval()
    x = torch.randn(2, 3, size, size)
    x0, feats, pending = net.forward_stem(x)
    low = math.ceil(math.ceil(size / 2) / 2)
    assert [t.shape[-1] for t in (x0,) + pending] == [low, size // 2, size]
    state = (x0, feats, pending)
    for k in range(net.num_exits):
        state, head_in = net.forward_block(k, state)
        assert head_in.shape[-1] == low  # every sub-network ends at the lowest resolution
    layer = net.subnets[1][0].layers[0]  # growth 8: floor(8 * 0.25) = 2 up-sampled + 6 own
    assert layer.conv_up[-1][0].out_channels == 2 and layer.conv_normal[-1][0].out_channels == 6


def test_forward_shapes_and_staged_execution_match():
    torch.manual_seed(0)
    net = create_model("ranet_mnist").eval()
    x = torch.randn(3, 1, 28, 28)
    logits, feats = net(x)
    assert net.num_exits == 4 and [tuple(t.shape) for t in logits] == [(3, 10)] * 4
    assert [t.shape[1] for t in feats] == net.feature_dims == [32] * 4
    state = net.forward_stem(x)
    for k in range(net.num_exits):
        state, lk = net.forward_stage(k, state)
        torch.testing.assert_close(lk, logits[k], rtol=0, atol=0)


def _rows(state, idx):
    return tree_map(lambda t: t.index_select(0, idx), state)


def test_row_gathered_state_equals_running_the_subset_from_scratch():
    """The early-exit evaluator's property: compacting the state between stages == a smaller batch."""
    torch.manual_seed(1)
    net = create_model("ranet_tiny").double().eval()
    x = torch.randn(6, 3, 28, 28, dtype=torch.float64)
    idx = torch.tensor([4, 1, 3])
    with torch.no_grad():
        ref, _ = net(x[idx])
        for cut in range(net.num_exits):
            state = net.forward_stem(x)
            for k in range(net.num_exits):
                if k == cut:
                    leaves = tree_flatten(state)[0]
                    assert leaves and all(t.shape[0] == 6 for t in leaves)  # batch-major pytree of tensors
                    state = _rows(state, idx)
                state, lk = net.forward_stage(k, state)
                if k >= cut:
                    torch.testing.assert_close(lk, ref[k], rtol=1e-12, atol=1e-12)


def test_state_keeps_only_what_later_stages_read():
    net = create_model("ranet_tiny")
    state = net.forward_stem(torch.randn(1, 3, 28, 28))
    counts = []
    for k in range(net.num_exits):
        state, _ = net.forward_stage(k, state)
        x, feats, pending = state
        counts.append((len(feats), len(pending)))
    # after exit 0: sub-net 0's one block (for sub-net 1's fusion) + 1 stem tensor pending; after exit 1:
    # sub-net 1's two blocks; the last sub-network keeps no features.
    assert counts == [(1, 1), (2, 0), (0, 0)]


def _stage_of_params(net):
    """Parameter name -> the stage that uses it (stem: 0); heads -> None."""
    owner = {}
    for k, st in enumerate(net._stages):
        for j in range(st.first_block, st.last_block + 1):
            for n, _ in net.subnets[st.subnet][j].named_parameters():
                owner[f"subnets.{st.subnet}.{j}.{n}"] = k
    for n, _ in net.stem.named_parameters():
        owner[f"stem.{n}"] = 0
    return owner


@pytest.mark.parametrize("name,size", [("ranet_tiny", 28), ("ranet_mnist", 28)])
def test_ge_divides_stage_gradients_by_the_exits_that_depend_on_them(name, size):
    """GE rule (module docstring): every parameter of stage k gets 1/(K-k) of the plain gradient; heads full."""
    torch.manual_seed(2)
    plain = create_model(name).double()
    ge = create_model(name, gradient_equilibrium=True).double()
    ge.load_state_dict(plain.state_dict())
    c = plain.cfg.in_channels
    x, y = torch.randn(4, c, size, size, dtype=torch.float64), torch.randint(0, plain.cfg.num_classes, (4,))
    for m in (plain, ge):
        logits, _ = m(x)
        sum(F.cross_entropy(z, y) for z in logits).backward()
    K, owner = plain.num_exits, _stage_of_params(plain)
    gp, gg = dict(plain.named_parameters()), dict(ge.named_parameters())
    checked = 0
    for n, p in gp.items():
        if p.grad is None:
            continue
        scale = 1.0 if n.startswith("heads.") else 1.0 / (K - owner[n])
        torch.testing.assert_close(gg[n].grad, p.grad * scale, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked == sum(1 for p in gp.values() if p.requires_grad)
    assert any(owner[n] > 0 for n in owner)  # several stages covered


def test_ge_forward_values_unchanged_and_state_aliases():
    torch.manual_seed(3)
    plain = create_model("ranet_tiny").eval()
    ge = create_model("ranet_tiny", gradient_equilibrium=True).eval()
    ge.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 28, 28)
    for a, b in zip(plain(x)[0], ge(x)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_compile_fullgraph_training_step_with_ge():
    torch.manual_seed(4)
    net = create_model("ranet_tiny", gradient_equilibrium=True)
    assert_compiled_step_matches_eager(net, torch.randn(4, 3, 28, 28), torch.randint(0, 3, (4,)))


@pytest.mark.slow
def test_compile_fullgraph_stages_eval():
    """Each stage compiles without graph breaks (what the evaluator compiles)."""
    torch.manual_seed(5)
    net = create_model("ranet_tiny").eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref, _ = net(x)
        state = torch.compile(net.forward_stem, fullgraph=True, backend="eager")(x)
        for k in range(net.num_exits):
            stage = torch.compile(lambda s, k=k: net.forward_stage(k, s), fullgraph=True, backend="eager")
            state, lk = stage(state)
            torch.testing.assert_close(lk, ref[k], rtol=1e-5, atol=1e-5)


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(6)
    net = create_model("ranet_mnist").eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref, _ = net(x)
        net_cl = net.to(memory_format=torch.channels_last)
        out32, _ = net_cl(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = net_cl(x.to(memory_format=torch.channels_last))
    for a, b, c in zip(out, ref, out32):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4)
        assert a.dtype == torch.bfloat16
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 5e-2, rel


def test_imta_stage_two_on_ranet():
    torch.manual_seed(7)
    backbone = create_model("ranet_tiny", gradient_equilibrium=True)
    net = create_imta_model(backbone).eval()
    x = torch.randn(2, 3, 28, 28)
    logits, teacher = net(x)
    assert len(logits) == 3 and teacher.shape == (2, 3)
    state = net.forward_stem(x)
    for k in range(net.num_exits):
        state, z = net.forward_stage(k, state)
        torch.testing.assert_close(z, logits[k], rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(gr_factor=(4, 2)), "equal length"),
    (dict(scale_list=(2, 1, 3)), "non-decreasing"),
    (dict(step_mode="lin_grow"), "'even' or 'lg'"),
    (dict(compress_factor=0.01), "up-sampled channels"),
    (dict(block_step=0), "block_step"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        RANetConfig(num_classes=10, **bad)


@pytest.mark.slow
def test_train_ce_ge_and_imta_on_tiny_ranet(tmp_path):
    """train.py builds RANet through the registry: digits (28x28x1, 10 classes) with ranet_tiny."""
    import train
    from imta_fast.train.checkpoint import load_checkpoint

    fast = ["--dataset", "digits", "--model", "ranet_tiny", "--holdout-size", "64", "--batch-size", "16",
            "--max-steps-per-epoch", "2", "--epochs", "1", "--no-progress", "--lr", "0.05"]
    assert train.main(fast + ["--output", str(tmp_path / "ce"), "--method", "ce"]) == 0
    assert train.main(fast + ["--output", str(tmp_path / "ge"), "--method", "ge"]) == 0
    assert train.main(fast + ["--output", str(tmp_path / "imta"), "--method", "imta",
                              "--teacher", str(tmp_path / "ge" / "last.pt")]) == 0
    ge = load_checkpoint(str(tmp_path / "ge" / "last.pt"))["model"]
    imta = load_checkpoint(str(tmp_path / "imta" / "last.pt"))["model"]
    assert any(k.startswith("subnets.") for k in ge)
    w = "subnets.2.0.layers.0.conv_up.0.0.weight"
    assert ge[w].shape[1] == 8 and torch.equal(imta[f"backbone.{w}"], ge[w])  # frozen backbone


def _tie_free(conf, thr):
    """Move each threshold to the midpoint between the confidences around it (same split, no sample on τ)."""
    out = thr.clone()
    for k in range(conf.shape[0] - 1):
        c = torch.unique(conf[k])
        below, above = c[c < thr[k]], c[c >= thr[k]]
        if len(below) and len(above):
            out[k] = (below.max() + above.min()) / 2
    return out


@pytest.mark.parametrize("bs,options", [
    (96, {}), (37, {}), (37, {"buckets": "pow2", "channels_last": True}), (37, {"fold_bn": True}),
    (37, {"compile": True, "compile_backend": "eager"}), (96, {"micro_batch": 20, "channels_last": True}),
], ids=["whole", "bs37", "pow2-channels_last", "fold_bn", "compile", "micro_batch"])
def test_early_exit_evaluator_parity_with_simulated_protocol(bs, options):
    """EarlyExitEvaluator on a random-init RANet == apply_thresholds on the full-network logits."""
    from imta_fast.inference.evaluator import EarlyExitEvaluator
    from imta_fast.inference.protocol import (apply_thresholds, confidences_and_predictions, exit_fractions,
                                              fit_thresholds)

    torch.manual_seed(8)
    net = create_model("ranet_tiny").eval()
    x = torch.randn(96, 3, 28, 28)
    with torch.no_grad():
        logits, _ = net(x)
    conf, pred = confidences_and_predictions(logits)
    thr = _tie_free(conf, fit_thresholds(conf, exit_fractions(1.0, net.num_exits)))
    labels = torch.randint(0, 3, (96,))
    sim = apply_thresholds(conf, pred, labels, thr)
    assert (sim.exit_counts > 0).all(), "every exit must get samples for the test to mean something"
    ev = EarlyExitEvaluator(net, thr, **options)
    outs = [ev(xb) for xb in x.split(bs)]
    exit_index = torch.cat([o.exit_index for o in outs])
    assert torch.equal(exit_index, sim.exit_index)
    assert torch.equal(torch.cat([o.predictions for o in outs]), pred.gather(0, sim.exit_index[None])[0])
    torch.testing.assert_close(torch.cat([o.confidence for o in outs]), conf.gather(0, sim.exit_index[None])[0],
                               rtol=1e-5, atol=1e-6)
    assert outs[0].active[0] == min(bs, 96) and outs[0].active[-1] < outs[0].active[0]  # really compacted


def test_reference_init_he_normal_fan_out_outside_the_stem():
    torch.manual_seed(9)
    net = create_model("ranet_cifar")
    conv = net.subnets[3][7].layers[3].conv_normal[0][0]  # the 1x1 bottleneck conv of a late layer
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (1 * 1 * conv.out_channels)), rel=0.05)
    assert all(torch.count_nonzero(h.linear.bias) == 0 for h in net.heads)
    stem = net.stem.layers[0][0]  # PyTorch's default (kaiming-uniform, a=sqrt(5)): bound 1/sqrt(fan_in)
    assert stem.weight.abs().max().item() <= 1 / math.sqrt(3 * 9) + 1e-6
    plain = RANet(model_config("ranet_cifar"), reference_init=False)
    w = plain.subnets[3][7].layers[3].conv_normal[0][0].weight
    assert w.abs().max().item() <= 1 / math.sqrt(w.shape[1]) + 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["distill", "l2w"])
def test_train_distill_and_l2w_on_tiny_ranet(tmp_path, method):
    import train

    assert train.main(["--dataset", "digits", "--model", "ranet_tiny", "--holdout-size", "64", "--batch-size", "16",
                       "--max-steps-per-epoch", "2", "--epochs", "1", "--no-progress", "--lr", "0.05",
                       "--method", method, "--output", str(tmp_path / method)]) == 0
    assert (tmp_path / method / "last.pt").exists()
