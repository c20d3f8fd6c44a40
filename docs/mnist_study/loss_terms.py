"""Magnitude of the stage-2 CE vs OFA-KD terms (per exit), 'mean' vs 'batchmean'.

usage: loss_terms.py GE_CKPT [IMTA_CKPT ...]   -> JSON lines
For the fresh stage-2 net built from GE_CKPT (epoch 0) and for each trained IMTA checkpoint, computes on
the first N training batches (train transform, model in train mode as during training, no optimizer step):
 per-exit CE, per-sample KL*T^2, the weighted contributions a_ce*CE and a_kd*KD/denom for both reductions,
 and the gradient norms of each weighted term wrt the trainable (head + ISC) parameters.
"""
import json, sys
from pathlib import Path
import torch, torch.nn.functional as F
from imta_fast.train.checkpoint import load_checkpoint
from imta_fast.data import build_data, build_train_loader
from imta_fast.models.build import build_model
from imta_fast.distributed import init_distributed

torch.set_num_threads(1)
NB = 20
def terms(model, loader, T, gamma, C):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    acc = None; n = 0
    for i, (x, y) in enumerate(loader):
        if i >= NB: break
        logits, teacher = model(x)
        K = len(logits)
        lpt = (teacher / T).log_softmax(-1); pt = lpt.exp()
        ce = [F.cross_entropy(z, y) for z in logits]
        kd = [(T * T) * (pt * (lpt - (z / T).log_softmax(-1))).sum(-1).mean() for z in logits[:-1]]
        # weighted terms (exits 1..K-1 get gamma, last exit CE only)
        w_ce = sum((1 - gamma) * c for c in ce[:-1]) + ce[-1]
        w_kd_bm = sum(gamma * k for k in kd)
        w_kd_mean = w_kd_bm / C
        def gnorm(t):
            g = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
            return float(torch.sqrt(sum((gi ** 2).sum() for gi in g if gi is not None)))
        h1 = list(model.classifiers[0].parameters())
        def g1(t):
            g = torch.autograd.grad(t, h1, retain_graph=True)
            return float(torch.sqrt(sum((gi ** 2).sum() for gi in g)))
        e1 = [g1((1 - gamma) * ce[0]), g1(gamma * kd[0] / C), g1(gamma * kd[0])]
        row = [*(float(c) for c in ce), *(float(k) for k in kd), float(w_ce), float(w_kd_mean), float(w_kd_bm),
               gnorm(w_ce), gnorm(w_kd_mean), gnorm(w_kd_bm),
               *(float((z.argmax(1) == teacher.argmax(1)).float().mean()) for z in logits[:-1]),
               float((teacher.argmax(1) == y).float().mean()), *e1]
        acc = row if acc is None else [a + r for a, r in zip(acc, row)]
        n += 1
    acc = [a / n for a in acc]
    K = len(logits)
    names = [f"ce_exit{k+1}" for k in range(K)] + [f"kl_T2_exit{k+1}" for k in range(K - 1)] + \
            ["weighted_ce", "weighted_kd_mean", "weighted_kd_batchmean", "gradnorm_ce", "gradnorm_kd_mean",
             "gradnorm_kd_batchmean"] + [f"agree_teacher_exit{k+1}" for k in range(K - 1)] + ["teacher_train_top1", "exit1_head_gradnorm_ce", "exit1_head_gradnorm_kd_mean", "exit1_head_gradnorm_kd_batchmean"]
    return dict(zip(names, [round(a, 4) for a in acc]))

ge = sys.argv[1]
gp = load_checkpoint(ge); cfg = dict(gp["config"]); kw = gp["model_kwargs"]
torch.manual_seed(0)
cfg.update(method="imta", isc_detach=False, backbone_bn="train")
data = build_data(cfg["dataset"], cfg["data_dir"], split_path=str(Path(ge).parent / "split.json"),
                  holdout_size=cfg["holdout_size"], holdout_transform="train", seed=cfg["seed"])
loader, _ = build_train_loader(data.train, 64, 0, 0, init_distributed("cpu"))
C = kw["num_classes"]; T = 3.0; gamma = 0.9
m = build_model(cfg, kw["num_classes"], kw["in_channels"], gp["model"])
print(json.dumps({"model": "fresh stage-2 heads on " + ge, **terms(m, loader, T, gamma, C)}))
for ck in sys.argv[2:]:
    p = load_checkpoint(ck)
    m = build_model(p["config"], kw["num_classes"], kw["in_channels"]); m.load_state_dict(p["model"])
    print(json.dumps({"model": ck + f" (epoch {p['epoch']+1}, kl={p['config']['kl_reduction']})", **terms(m, loader, T, gamma, C)}))
