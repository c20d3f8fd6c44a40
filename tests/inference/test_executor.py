"""imta_fast.inference.executor: stage k on an opaque state, row gathering, padding (model-agnostic)."""
import pytest
import torch

from imta_fast.inference.executor import (_AUTO_MIN_ROWS, AUTO_MICRO_BATCH_BYTES, DEFAULT_COMPILED_BUCKETS, Chunks,
                                          StageExecutor, chunk_sizes)
from imta_fast.inference.protocol import max_softmax
from imta_fast.models import create_model


def _model():
    torch.manual_seed(0)
    return create_model("msdnet_tiny").eval()


def test_run_stages_equals_model_forward():
    model, x = _model(), torch.randn(12, 3, 16, 16)
    ex = StageExecutor(model)
    state, rows = ex.prepare(x)
    assert rows == 12 and state is x
    with torch.no_grad():
        logits, _ = model(x)
        for k in range(ex.num_stages):
            state, conf, pred = ex.run(k, state, x.device)
            ref_conf, ref_pred = max_softmax(logits[k])
            assert torch.equal(conf, ref_conf) and torch.equal(pred, ref_pred)


def test_gather_selects_rows_of_every_leaf_and_keeps_non_tensors():
    ex = StageExecutor(_model())
    state = ([torch.arange(5.0)[:, None], torch.arange(5.0)[:, None, None, None].expand(5, 2, 3, 3).contiguous(
        memory_format=torch.channels_last)], None, 7)
    out = ex.gather(1, state, torch.tensor([4, 1, 1]))
    assert out[0][0].flatten().tolist() == [4.0, 1.0, 1.0]
    assert out[0][1].is_contiguous(memory_format=torch.channels_last) and out[0][1].shape[0] == 3
    assert out[1] is None and out[2] == 7


def test_prepare_pads_with_valid_rows():
    model = _model()
    ex = StageExecutor(model, buckets=[8], min_rows=2)
    x = torch.randn(5, 3, 16, 16)
    state, rows = ex.prepare(x)
    assert rows == 8 and state.shape[0] == 8
    assert torch.equal(state[:5], x) and torch.equal(state[5:], x[:1].expand(3, -1, -1, -1))
    assert ex.rows(1, 5) == 8 and StageExecutor(model, min_rows=1).rows(1) == 1


def test_compiled_or_graphed_default_buckets_and_bad_options():
    model = _model()
    assert StageExecutor(model, cuda_graphs=True).buckets == DEFAULT_COMPILED_BUCKETS
    assert StageExecutor(model).buckets is None
    with pytest.raises(ValueError):
        StageExecutor(model, buckets="pow3")
    with pytest.raises(ValueError):
        StageExecutor(model, cuda_graphs=True, compile=True, compile_mode="reduce-overhead")


def test_fold_batchnorm_copy_matches_and_leaves_the_model_alone():
    from imta_fast.inference.executor import fold_batchnorm

    model = _model()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, as after training
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    model = model.double()  # float64 reference: the fold itself is exact up to rounding
    folded = fold_batchnorm(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 0 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) < n_bn
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = model(x)
        out, _ = folded(x)
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    ex = StageExecutor(model.float(), fold_bn=True)
    assert ex.model is not model and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


# ----------------------------------------------------------------------------- micro-batches (row chunks)
@pytest.mark.parametrize("rows,m,step,expected", [
    (10, 16, None, [10]), (10, 4, None, [4, 3, 3]), (1024, 128, None, [128] * 8), (9, 4, None, [3, 3, 3]),
    (192, 100, 64, [128, 64]), (256, 64, 64, [64] * 4), (130, 64, None, [44, 43, 43])])
def test_chunk_sizes_balanced_or_on_the_bucket_step(rows, m, step, expected):
    assert chunk_sizes(rows, m, step) == expected
    assert sum(expected) == rows


@torch.no_grad()
def test_chunked_stages_equal_whole_stages_and_gather_repacks():
    model = _model()
    assert model.num_exits == 3
    x = torch.randn(23, 3, 16, 16)
    whole, chunked = StageExecutor(model), StageExecutor(model, micro_batch=5)
    s_w, rows = whole.prepare(x)
    s_c, rows_c = chunked.prepare(x)
    assert rows == rows_c == 23 and isinstance(s_c, Chunks) and [c.shape[0] for c in s_c] == [5, 5, 5, 4, 4]
    # survivors across chunks, then a padding row; then a subset of those
    gathers = [torch.tensor([0, 3, 4, 5, 9, 12, 13, 14, 20, 22, 1]), torch.tensor([1, 2, 6, 7, 8, 10, 0, 4, 5, 3])]
    packed = [[4, 4, 3], [5, 5]]  # re-packed into full (balanced) chunks of <= 5 rows (the limit, not 4)
    for k in range(model.num_exits):
        s_w, c_w, p_w = whole.run(k, s_w, x.device)
        s_c, c_c, p_c = chunked.run(k, s_c, x.device)
        torch.testing.assert_close(c_c, c_w, rtol=1e-6, atol=1e-6)
        assert torch.equal(p_c, p_w)
        if k < len(gathers):
            s_w = whole.gather(k + 1, s_w, gathers[k])
            s_c = chunked.gather(k + 1, s_c, gathers[k])
            assert [t[0].shape[0] for t in s_c] == packed[k]
            for a, b in zip(s_w, [torch.cat(ts) for ts in zip(*s_c)]):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
                assert b.shape == a.shape


@torch.no_grad()
def test_micro_batch_auto_sizes_chunks_from_state_bytes_and_keeps_memory_format():
    model = _model().to(memory_format=torch.channels_last)
    ex = StageExecutor(model, micro_batch="auto", channels_last=True)
    x = torch.randn(64, 3, 16, 16)
    m = ex.chunk_rows(x)
    state, _, _ = ex.run(0, ex.prepare(x[:2])[0], x.device)
    per_row = max(t[0].numel() * t.element_size() for t in state)
    assert m == max(_AUTO_MIN_ROWS, AUTO_MICRO_BATCH_BYTES // per_row)
    ex_small = StageExecutor(model, micro_batch=16, channels_last=True)
    s, _ = ex_small.prepare(x)
    s, _, _ = ex_small.run(0, s, x.device)
    s = ex_small.gather(1, s, torch.arange(0, 64, 2))
    assert all(t.is_contiguous(memory_format=torch.channels_last) for c in s for t in c if t.dim() == 4)
    with pytest.raises(ValueError, match="micro_batch"):
        StageExecutor(model, micro_batch=0)
    with pytest.raises(ValueError, match="cuda_graphs"):
        StageExecutor(model, micro_batch=8, cuda_graphs=True)
