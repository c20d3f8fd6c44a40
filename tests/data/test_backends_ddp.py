"""make_loader under a real 2-process gloo group (torchrun): eval shards through ``predict`` and
``all_gather_cat``, train shards disjoint, for every backend (DALI in CPU mode when installed).

The in-process tests (test_backends.py, test_dali_backend.py) simulate ranks with DistInfo objects;
this one checks the same contract through the real collectives, including uneven eval shards
(23 samples on 2 ranks: 11 + 12, gathered with padding trimmed by all_gather_cat).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


class _MeanModel(nn.Module):
    """Two 'exits' whose logits are per-image statistics, so gathered rows identify the images."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return [torch.cat([m, -m], 1), torch.cat([2 * m, m], 1)], None


def _ids_dataset(n):
    from imta_fast.data.datasets import TensorImages, TransformedDataset
    from imta_fast.data.transforms import tensor_eval_transform, tensor_train_transform

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    ev = tensor_eval_transform((0.5,) * 3, (0.25,) * 3)
    tr = tensor_train_transform(8, padding=2, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    return TransformedDataset(TensorImages(images, torch.arange(n)), tr, ev), \
        TransformedDataset(TensorImages(images, torch.arange(n)), ev, ev)


def _worker() -> None:
    from imta_fast import distributed as D
    from imta_fast.data import build_data, has_dali, make_loader
    from imta_fast.inference.predict import predict

    info = D.init_distributed("cpu")
    try:
        train_ds, eval_ds = _ids_dataset(23)
        cases = [("pytorch", train_ds, eval_ds), ("device", train_ds, eval_ds)]
        folder = os.environ.get("IMTA_TEST_FOLDER")
        if folder and has_dali():
            data = build_data("imagenet", folder, None, holdout_size=3, image_size=16)
            cases.append(("dali", data.train, data.test))
        model = _MeanModel()
        for backend, train, test in cases:
            ref = make_loader(test, backend=backend, train=False, batch_size=4, workers=0, seed=0,
                              dist=D.DistInfo())  # the whole test set in one process
            ref_x = torch.cat([x for x, _ in ref])  # not predict(): it would gather over the group
            ref_labels = torch.cat([y for _, y in ref])
            ref_logits = torch.stack(model(ref_x)[0])
            loader = make_loader(test, backend=backend, train=False, batch_size=4, workers=0, seed=0, dist=info)
            logits, labels = predict(model, loader, torch.device("cpu"))
            assert torch.equal(labels, ref_labels), (backend, labels)
            assert torch.equal(logits, ref_logits), backend
            assert logits.shape[:2] == (2, len(test))
            tl = make_loader(train, backend=backend, train=True, batch_size=2, workers=0, seed=3, dist=info)
            for epoch in range(2):
                tl.set_epoch(epoch)
                mine = torch.cat([y for _, y in tl]).tolist() if backend != "dali" else \
                    [i for _, y in tl for i in y.tolist()]
                everyone = D.all_gather_object(mine)
                assert len(everyone[0]) == len(everyone[1]) == len(tl) * 2, (backend, everyone)
                if backend != "dali":  # labels are sample ids here: no sample on both ranks
                    assert not set(everyone[0]) & set(everyone[1]), (backend, everyone)
        D.barrier()
        print(f"rank {info.rank}: ok {[c[0] for c in cases]}", flush=True)
    finally:
        D.cleanup()


@pytest.mark.slow
def test_two_gloo_processes_share_every_backend_exactly(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from imta_fast.data.fake import write_fake_image_folder

    write_fake_image_folder(tmp_path, n_train=4, n_val=3, size=(24, 30))  # 6 test images: 3 + 3
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", IMTA_TEST_FOLDER=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process gloo run timed out; output:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "rank 0: ok" in proc.stdout and "rank 1: ok" in proc.stdout
    from imta_fast.data import has_dali
    assert ("'dali'" in proc.stdout) == has_dali()  # DALI's CPU mode was exercised when installed


if __name__ == "__main__":
    _worker()
