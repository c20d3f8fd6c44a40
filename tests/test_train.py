"""train.py end to end on the embedded digits data (CPU): resume equality, DDP, errors, NaN stop."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from imta_fast.train.checkpoint import load_checkpoint
from imta_fast.train.methods.base import CrossEntropyMethod
from imta_fast.data import has_dali
from imta_fast.data.fake import write_fake_image_folder
from tests.helpers import FAST, interrupted_and_resumed
from tests.helpers import train_main as run

ROOT = Path(__file__).resolve().parents[1]


def weights(path):
    return load_checkpoint(str(path))["model"]


def assert_same_weights(a, b):
    sa, sb = weights(a), weights(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("workers,backend", [("0", "pytorch"), ("2", "pytorch"), ("0", "device")])
def test_interrupt_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch, workers, backend):
    interrupted_and_resumed(tmp_path, monkeypatch, "--data-backend", backend, "-j", workers, cut_epoch=1)
    assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "cut" / "last.pt")
    rows = (tmp_path / "cut" / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + one row per epoch, none duplicated


@pytest.mark.slow
def test_sigkill_then_resume_auto(tmp_path):
    """A real kill -9 while training; --resume auto finishes with the uninterrupted weights."""
    args = [sys.executable, "train.py", *FAST, "--epochs", "4", "--max-steps-per-epoch", "12"]
    subprocess.run(args + ["--output", str(tmp_path / "full")], cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen(args + ["--output", str(tmp_path / "cut")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(args + ["--output", str(tmp_path / "cut"), "--resume", "auto"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_weights(tmp_path / "full" / "last.pt", last)


def test_imta_stage_two_trains_only_new_heads(tmp_path):
    assert run(tmp_path / "ge", "--epochs", "1", "--method", "ge") == 0
    assert run(tmp_path / "imta", "--epochs", "1", "--method", "imta", "--teacher", str(tmp_path / "ge" / "last.pt"),
               "--kl-reduction", "batchmean", "--isc-detach", "--backbone-bn", "eval") == 0
    ge, imta = weights(tmp_path / "ge" / "last.pt"), weights(tmp_path / "imta" / "last.pt")
    for k, v in ge.items():  # frozen backbone, BN statistics included with --backbone-bn eval
        assert torch.equal(imta[f"backbone.{k}"], v), k
    assert any(k.startswith("isc.") for k in imta)
    assert (tmp_path / "imta" / "split.json").read_text() == (tmp_path / "ge" / "split.json").read_text()


def one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--method", "imta"], "--teacher"),
    (["--method", "imta", "--teacher", "/nonexistent/ge.pt"], "/nonexistent/ge.pt"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, extra, needle):
    rc = train.main(FAST + ["--output", str(tmp_path / "r"), *extra])
    assert needle in one_line_error(capsys, rc)


def test_wrong_imagenet_layout_is_named(tmp_path, capsys):
    (tmp_path / "imnet" / "images").mkdir(parents=True)
    rc = train.main(FAST + ["--dataset", "imagenet", "--data-dir", str(tmp_path / "imnet"), "--output", str(tmp_path / "r")])
    assert "train" in one_line_error(capsys, rc)


def test_resume_with_other_config_is_refused(tmp_path, capsys):
    assert run(tmp_path / "r", "--epochs", "1") == 0
    capsys.readouterr()
    rc = run(tmp_path / "r", "--epochs", "2", "--method", "ge", "--resume", "auto")
    line = one_line_error(capsys, rc)
    assert "method" in line and "'ce'" in line and "'ge'" in line


def test_teacher_of_another_model_is_refused(tmp_path, capsys):
    assert run(tmp_path / "ge", "--epochs", "1", "--method", "ge") == 0
    capsys.readouterr()
    rc = run(tmp_path / "imta", "--epochs", "1", "--method", "imta", "--teacher", str(tmp_path / "ge" / "last.pt"),
             "--model", "msdnet_tiny")
    assert "model" in one_line_error(capsys, rc)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    assert run(tmp_path / "r", "--epochs", "1") == 0
    good = weights(tmp_path / "r" / "last.pt")
    capsys.readouterr()
    real_loss = CrossEntropyMethod.loss
    monkeypatch.setattr(CrossEntropyMethod, "loss",
                        lambda self, *a: (lambda l, z: (l * float("nan"), z))(*real_loss(self, *a)))
    rc = run(tmp_path / "r", "--epochs", "2", "--resume", "auto")
    assert "non-finite loss at global step 3 " in one_line_error(capsys, rc)
    after = load_checkpoint(str(tmp_path / "r" / "last.pt"))
    assert after["epoch"] == 0 and all(torch.equal(after["model"][k], v) for k, v in good.items())


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *FAST,
           "--epochs", "2", "--device", "cpu", "--output", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    assert payload["epoch"] == 1 and len(payload["rng"]) == 2  # one RNG state per rank
    rows = (tmp_path / "ddp" / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    # 2 ranks x 3 steps x 16 images per epoch, counted across ranks.
    assert payload["step"] == 6


@pytest.mark.skipif(not has_dali(), reason="nvidia-dali is not installed")
def test_imagenet_folder_with_dali_backend_cpu(tmp_path):
    """ImageFolder JPEGs through DALI's CPU pipeline (device_id=None) into a training run."""
    root = write_fake_image_folder(tmp_path / "imnet", classes=("cat", "dog", "eel"), n_train=6, n_val=2)
    rc = train.main(["--dataset", "imagenet", "--data-dir", str(root), "--data-backend", "dali", "--image-size", "16",
                     "--model", "msdnet_tiny", "--holdout-size", "3", "--batch-size", "4", "--epochs", "1",
                     "--no-progress", "--output", str(tmp_path / "r")])
    assert rc == 0
    payload = load_checkpoint(str(tmp_path / "r" / "last.pt"))
    assert payload["model_kwargs"] == {"num_classes": 3, "in_channels": 3, "image_size": 16}
    assert payload["step"] == (18 - 3) // 4  # DALI drops the last partial training batch
    import eval as evaluate  # the run's crop size and split carry over into evaluation

    assert evaluate.main([str(tmp_path / "r"), "--budget-points", "4"]) == 0
    assert (tmp_path / "r" / "budgeted.csv").is_file()


def test_dali_backend_needs_an_image_folder_dataset(tmp_path, capsys):
    rc = train.main(FAST + ["--data-backend", "dali", "--output", str(tmp_path / "r")])
    assert "--dataset imagenet" in one_line_error(capsys, rc)


def test_teacher_trained_on_another_split_is_refused(tmp_path, capsys):
    assert run(tmp_path / "ge", "--epochs", "1", "--method", "ge", "--seed", "1") == 0
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "ge" / "last.pt").rename(moved / "ge.pt")  # its split.json stays behind
    capsys.readouterr()
    rc = run(tmp_path / "imta", "--epochs", "1", "--method", "imta", "--teacher", str(moved / "ge.pt"))
    assert "split" in one_line_error(capsys, rc)


def test_batch_larger_than_training_set_is_one_line_error(tmp_path, capsys):
    rc = run(tmp_path / "r", "--epochs", "1", "--batch-size", "4096")
    assert "--batch-size 4096" in one_line_error(capsys, rc)


def test_fp16_autocast_uses_a_grad_scaler_and_resumes_it(tmp_path):
    assert run(tmp_path / "r", "--epochs", "1", "--amp", "--amp-dtype", "float16") == 0
    payload = load_checkpoint(str(tmp_path / "r" / "last.pt"))
    assert "scaler" in payload and payload["scaler"]["scale"] > 0
    assert run(tmp_path / "r", "--epochs", "2", "--amp", "--amp-dtype", "float16", "--resume", "auto") == 0


@pytest.mark.slow
def test_compile_and_channels_last_training_run(tmp_path):
    """--compile (inductor on CPU) and --channels-last through a whole run, then a resume."""
    root = write_fake_image_folder(tmp_path / "imnet", classes=("cat", "dog"), n_train=8, n_val=2)
    args = ["--dataset", "imagenet", "--data-dir", str(root), "--image-size", "16", "--model", "msdnet_tiny",
            "--method", "ge", "--holdout-size", "4", "--batch-size", "4", "--compile", "--channels-last",
            "--no-progress", "--output", str(tmp_path / "r")]
    assert train.main(args + ["--epochs", "1"]) == 0
    assert train.main(args + ["--epochs", "2", "--resume", "auto"]) == 0
    payload = load_checkpoint(str(tmp_path / "r" / "last.pt"))
    assert payload["epoch"] == 1 and not any(k.startswith("_orig_mod") for k in payload["model"])
