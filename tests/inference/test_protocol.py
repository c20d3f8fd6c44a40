"""Tests for imta_fast.inference.protocol: the budgeted protocol (docs/method.md §6) against hand-worked examples and
against a per-sample transcription of the reference loops; latency-budget fitting."""
import math

import pytest
import torch

from imta_fast.inference.protocol import (
    EXIT_ALWAYS,
    EXIT_NEVER,
    anytime_accuracy,
    apply_thresholds,
    budget_sweep,
    budgeted_evaluation,
    confidences_and_predictions,
    exit_fractions,
    fit_thresholds,
)
from imta_fast.inference.latency import StageCosts, fit_latency_budget, predict_latency
from imta_fast.inference.rundir import cache_key, cached_logits

# Hand-made example, K = 3 exits, N = 6 samples (s0..s5).
CONF = torch.tensor([
    [0.90, 0.80, 0.70, 0.60, 0.50, 0.40],  # c_1
    [0.30, 0.95, 0.85, 0.20, 0.75, 0.10],  # c_2
    [0.50, 0.50, 0.50, 0.50, 0.50, 0.50],  # c_3 (never looked at)
])
PRED = torch.tensor([
    [1, 2, 0, 0, 0, 0],
    [0, 0, 3, 0, 9, 0],
    [0, 0, 0, 4, 0, 6],
])
LABELS = torch.tensor([1, 0, 3, 4, 0, 6])
MACS = [10.0, 20.0, 30.0]


# ----------------------------------------------------------------------------- reference transcription
def naive_fit(conf, fractions):
    """The reference's dynamic_eval_find_threshold, sample by sample (float32 like the original)."""
    K, n = conf.shape
    _, sorted_idx = conf.sort(dim=1, descending=True)
    filtered = torch.zeros(n)
    T = torch.full((K,), 1e8)
    for k in range(K - 1):
        count, out_n = 0, math.floor(n * fractions[k])
        for i in range(n):
            ori = sorted_idx[k][i]
            if filtered[ori] == 0:
                count += 1
                if count == out_n:
                    T[k] = conf[k][ori]
                    break
        filtered.add_(conf[k].ge(T[k]).type_as(filtered))
    T[K - 1] = -1e8
    return T


def naive_apply(conf, pred, labels, T, macs):
    """The reference's dynamic_eval_with_threshold, sample by sample."""
    K, n = conf.shape
    acc, exp, idx = 0, [0] * K, []
    for i in range(n):
        for k in range(K):
            if conf[k][i].item() >= T[k]:
                acc += int(pred[k][i].item() == labels[i].item())
                exp[k] += 1
                idx.append(k)
                break
    return acc * 100.0 / n, sum(e / n * f for e, f in zip(exp, macs)), exp, idx


# ----------------------------------------------------------------------------- budgets
def test_exit_fractions_geometric_and_normalised():
    for K in (3, 5, 7):
        for q in (0.05, 0.5, 1.0, 1.95, 2.0):
            pi = exit_fractions(q, K)
            assert pi.dtype == torch.float32 and pi.shape == (K,)
            want = torch.tensor([q ** k for k in range(1, K + 1)], dtype=torch.float64)
            torch.testing.assert_close(pi.double(), want / want.sum(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(exit_fractions(1.0, 4), torch.full((4,), 0.25))
    with pytest.raises(ValueError):
        exit_fractions(0.0, 3)


def test_budget_sweep_grids():
    imta, msd = budget_sweep(5), budget_sweep(5, points=39)
    assert len(imta) == 40 and imta[0] == 0.05 and imta[-1] == 2.0
    assert len(msd) == 39 and msd[-1] == 1.95


# ----------------------------------------------------------------------------- hand-worked fitting
def test_fit_thresholds_hand_example():
    # π = (1/3, 1/3, 1/3) -> n_1 = n_2 = floor(6/3) = 2.
    # Exit 1: c_1 sorted desc = .9 (s0), .8 (s1), ...  -> τ_1 = 0.80; s0, s1 exit.
    # Exit 2: not-exited s2..s5 have c_2 = .85, .20, .75, .10; sorted .85 (s2), .75 (s4) -> τ_2 = 0.75.
    #   (s1's c_2 = .95 is larger but s1 already left, so it does not count.)  s2, s4 exit.
    # Exit 3: τ_3 = -1e8, s3 and s5 exit there.
    thr = fit_thresholds(CONF, exit_fractions(1.0, 3))
    torch.testing.assert_close(thr, torch.tensor([0.80, 0.75, EXIT_ALWAYS]))
    acc, macs, counts, idx = apply_thresholds(CONF, PRED, LABELS, thr, MACS)
    assert idx.tolist() == [0, 0, 1, 2, 1, 2]
    assert counts.tolist() == [2, 2, 2]
    # predictions at the exits: s0:1 ok, s1:2 (label 0) wrong, s2:3 ok, s3:4 ok, s4:9 wrong, s5:6 ok -> 4/6.
    assert acc == pytest.approx(400 / 6)
    assert macs == pytest.approx((2 * 10 + 2 * 20 + 2 * 30) / 6)  # 20.0


def test_fit_thresholds_custom_fractions():
    # π = (.5, .5, 0): n_1 = 3 -> τ_1 = .70 (s0, s1, s2 exit); n_2 = 3 among s3, s4, s5 with
    # c_2 = .20, .75, .10 -> the 3rd largest is .10 -> τ_2 = .10, everyone left exits at 2.
    thr = fit_thresholds(CONF, torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(thr, torch.tensor([0.70, 0.10, EXIT_ALWAYS]))
    acc, macs, counts, _ = apply_thresholds(CONF, PRED, LABELS, thr, MACS)
    assert counts.tolist() == [3, 3, 0]
    assert macs == pytest.approx(15.0)
    assert acc == pytest.approx(100 / 6)  # only s0 is right (s1: 2≠0, s2: 0≠3, s3: 0≠4, s4: 9≠0, s5: 0≠6)


def test_fit_thresholds_ties_exit_together():
    # c_1 has a 3-way tie at .8: n_1 = 2 -> τ_1 = .8, and all of s1, s2, s3 exit (≥), 4 > 2 targeted.
    # Exit 2: n_2 = 2, exactly s4, s5 remain (c_2 = .75, .10) -> τ_2 = .10.
    conf = CONF.clone()
    conf[0] = torch.tensor([0.9, 0.8, 0.8, 0.8, 0.5, 0.4])
    thr = fit_thresholds(conf, exit_fractions(1.0, 3))
    torch.testing.assert_close(thr, torch.tensor([0.80, 0.10, EXIT_ALWAYS]))
    assert apply_thresholds(conf, PRED, LABELS, thr).exit_counts.tolist() == [4, 2, 0]


def test_fit_thresholds_too_few_remaining():
    # n_1 = 3 but the tie at .8 lets 5 samples exit; n_2 = 3 > 1 remaining -> τ_2 = +1e8.
    conf = CONF.clone()
    conf[0] = torch.tensor([0.9, 0.8, 0.8, 0.8, 0.8, 0.4])
    thr = fit_thresholds(conf, torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(thr, torch.tensor([0.80, EXIT_NEVER, EXIT_ALWAYS]))
    assert apply_thresholds(conf, PRED, LABELS, thr).exit_counts.tolist() == [5, 0, 1]


def test_fit_thresholds_zero_counts():
    # π = (0, 0, 1): n_1 = n_2 = 0 -> nothing exits early, the full network for everyone.
    thr = fit_thresholds(CONF, torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(thr, torch.tensor([EXIT_NEVER, EXIT_NEVER, EXIT_ALWAYS]))
    _, macs, counts, _ = apply_thresholds(CONF, PRED, LABELS, thr, MACS)
    assert counts.tolist() == [0, 0, 6] and macs == pytest.approx(30.0)
    # q = 0.05 over 3 exits: π ≈ (.9505, .0475, .0024) -> n = (5, 0, 0): τ_2 = +1e8.
    thr = fit_thresholds(CONF, exit_fractions(0.05, 3))
    assert thr[0].item() == pytest.approx(0.5) and thr[1].item() == EXIT_NEVER
    assert apply_thresholds(CONF, PRED, LABELS, thr).exit_counts.tolist() == [5, 0, 1]


def test_apply_thresholds_user_last_threshold_still_exits_everyone():
    thr = torch.tensor([0.99, 0.99, 0.99])  # nobody passes anything: all assigned to the last exit
    _, _, counts, _ = apply_thresholds(CONF, PRED, LABELS, thr, MACS)
    assert counts.tolist() == [0, 0, 6]


# ----------------------------------------------------------------------------- vs the reference loops
@pytest.mark.parametrize("seed,K,N,levels", [(0, 5, 300, None), (1, 4, 257, 7), (2, 7, 120, 3), (3, 3, 50, None)])
def test_vectorised_matches_reference_loops(seed, K, N, levels):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(K, N, generator=g)
    if levels:  # quantise to force many ties
        conf = torch.floor(conf * levels) / levels
    pred = torch.randint(0, 10, (K, N), generator=g)
    labels = torch.randint(0, 10, (N,), generator=g)
    macs = sorted(torch.rand(K, generator=g).mul(100).tolist())
    for q in budget_sweep(K, 40)[::3] + [1.0]:
        pi = exit_fractions(q, K)
        thr = fit_thresholds(conf, pi)
        torch.testing.assert_close(thr, naive_fit(conf, pi), rtol=0, atol=0)
        acc, emacs, counts, idx = apply_thresholds(conf, pred, labels, thr, macs)
        r_acc, r_macs, r_counts, r_idx = naive_apply(conf, pred, labels, thr, macs)
        assert acc == pytest.approx(r_acc) and emacs == pytest.approx(r_macs)
        assert counts.tolist() == r_counts and idx.tolist() == r_idx


# ----------------------------------------------------------------------------- sweeps and anytime
def _logits(seed, K=4, N=200, C=10):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    # later exits are sharper and more often right
    logits = torch.randn(K, N, C, generator=g)
    for k in range(K):
        logits[k, torch.arange(N), labels] += 0.8 * (k + 1)
    return logits, labels


def test_confidences_chunked_and_from_probs():
    logits, _ = _logits(0, C=13)
    c1, p1 = confidences_and_predictions(logits, chunk_size=7)
    c2, p2 = confidences_and_predictions(list(logits), chunk_size=1 << 20)
    assert torch.equal(c1, c2) and torch.equal(p1, p2)
    c3, p3 = confidences_and_predictions(torch.softmax(logits, -1), from_probs=True)
    torch.testing.assert_close(c3, c1)
    assert torch.equal(p3, p1)
    assert c1.dtype == torch.float32 and p1.dtype == torch.long and c1.shape == (4, 200)


def test_budgeted_evaluation_rows():
    fit_logits, fit_labels = _logits(1)
    test_logits, test_labels = _logits(2, N=150)
    macs = [10.0, 20.0, 30.0, 40.0]
    rows = budgeted_evaluation(fit_logits, fit_labels, test_logits, test_labels, macs, points=39)
    assert len(rows) == 39 and rows[0].q == 0.05 and rows[-1].q == 1.95
    fit_conf, fit_pred = confidences_and_predictions(fit_logits)
    test_conf, test_pred = confidences_and_predictions(test_logits)
    for row in rows[::5]:
        thr = fit_thresholds(fit_conf, exit_fractions(row.q, 4))
        assert row.thresholds == thr.tolist()
        acc, emacs, counts, _ = apply_thresholds(test_conf, test_pred, test_labels, thr, macs)
        assert row.test_accuracy == acc and row.expected_macs == pytest.approx(emacs)
        assert row.fit_accuracy == apply_thresholds(fit_conf, fit_pred, fit_labels, thr).accuracy
        assert sum(row.exit_fractions) == pytest.approx(1.0)
        assert set(row.to_dict()) >= {"q", "test_accuracy", "expected_macs", "exit_fractions"}
    # Back-loading the exits (larger q) costs more here.
    assert rows[0].expected_macs < rows[19].expected_macs < rows[-1].expected_macs
    # Probabilities in, same answer.
    rows_p = budgeted_evaluation(fit_logits.softmax(-1), fit_labels, test_logits.softmax(-1), test_labels, macs,
                                 qs=[0.5, 1.0], from_probs=True)
    assert [r.test_accuracy for r in rows_p] == [r.test_accuracy for r in rows if r.q in (0.5, 1.0)]


def test_anytime_accuracy_by_hand():
    logits = torch.tensor([
        [[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]],  # exit 1: top1 = (0, 3)
        [[0.0, 3.0, 2.0, 1.0], [1.0, 0.0, 3.0, 2.0]],  # exit 2: top1 = (1, 2)
    ])
    labels = torch.tensor([1, 2])
    acc = anytime_accuracy(logits, labels, topk=(1, 2, 5))
    assert acc[1] == [0.0, 100.0]
    assert acc[2] == [100.0, 100.0]  # exit 1: 1 is 2nd for s0, 2 is 2nd for s1
    assert acc[5] == [100.0, 100.0]  # clipped to C = 4


# ----------------------------------------------------------------------------- latency budgets
def test_predict_latency_by_hand():
    costs = StageCosts(batch_size=4, per_image_ms=[1.0, 2.0, 3.0], overhead_ms=[4.0, 0.0, 0.0])
    # active fractions 1, .5, 0 -> 1·1 + 4/4 + 2·.5 + (stage 3 skipped) = 3.0
    assert predict_latency([0.5, 0.5, 0.0], costs) == pytest.approx(3.0)
    # bucket [4]: the 2 survivors are padded to 4 rows -> 1 + 1 + 2·4/4 = 4.0
    assert predict_latency([0.5, 0.5, 0.0], costs, buckets=[4]) == pytest.approx(4.0)
    # full network: 1 + 1 + 2 + 3 = 7.0
    assert predict_latency([0.0, 0.0, 1.0], costs) == pytest.approx(7.0)


def test_fit_latency_budget_satisfies_and_is_monotone():
    logits, labels = _logits(3, K=4, N=400)
    conf, pred = confidences_and_predictions(logits)
    costs = StageCosts(batch_size=64, per_image_ms=[0.4, 0.3, 0.3, 0.2], overhead_ms=[0.5, 0.5, 0.5, 0.5])
    full = predict_latency([0, 0, 0, 1], costs)
    cheapest = predict_latency([1, 0, 0, 0], costs)
    accs = []
    for budget in torch.linspace(cheapest, full, 12).tolist():
        fit = fit_latency_budget(conf, pred, labels, costs, budget)
        assert fit.feasible and fit.predicted_ms <= budget + 1e-9
        # the returned thresholds reproduce the prediction and the accuracy
        res = apply_thresholds(conf, pred, labels, fit.thresholds)
        assert res.accuracy == fit.accuracy
        assert predict_latency(res.exit_counts.double() / 400, costs) == pytest.approx(fit.predicted_ms)
        # nothing feasible is more accurate
        assert all(acc <= fit.accuracy for _, ms, acc in fit.candidates if ms <= budget)
        accs.append(fit.accuracy)
    assert accs == sorted(accs) and accs[-1] > accs[0]
    # a budget below everything: infeasible, cheapest returned
    low = fit_latency_budget(conf, pred, labels, costs, cheapest / 2)
    assert not low.feasible and low.predicted_ms == pytest.approx(cheapest)


# ----------------------------------------------------------------------------- logits cache (docs/method.md §9.1 item 9)
def test_cached_logits_recomputes_when_checkpoint_changes(tmp_path):
    sd = {"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    key = cache_key(sd, split="test", transforms="eval")
    assert key == cache_key(dict(sd), split="test", transforms="eval")
    assert key != cache_key(sd, split="val", transforms="eval")
    calls = []

    def compute(v):
        calls.append(v)
        return torch.full((2, 4, 3), float(v)), torch.arange(4)

    path = tmp_path / "logits.pt"
    assert cached_logits(path, key, lambda: compute(1))[0].eq(1).all() and calls == [1]
    assert cached_logits(path, key, lambda: compute(2))[0].eq(1).all() and calls == [1]  # hit
    sd["w"] += 1  # new checkpoint -> new key -> recompute
    new_key = cache_key(sd, split="test", transforms="eval")
    assert new_key != key
    assert cached_logits(path, new_key, lambda: compute(3))[0].eq(3).all() and calls == [1, 3]
    ckpt = tmp_path / "ckpt.pth"
    torch.save(sd, ckpt)
    assert cache_key(ckpt) == cache_key(str(ckpt)) != cache_key(ckpt, split="x")
