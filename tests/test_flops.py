"""Per-exit costs must reproduce the published MSDNet/IMTA numbers (spec §1.8) to 0.01 M."""
import pytest
import torch

from imta_fast.flops import count_exit_costs
from imta_fast.models import create_model

# (model, overrides, input shape, cumulative MMACs, cumulative Mparams, params decimals)
PUBLISHED = [
    ("msdnet_imagenet_step4", {}, (3, 224, 224),
     [339.90, 685.46, 1008.16, 1254.47, 1360.53], [4.24, 8.77, 13.07, 16.75, 23.96], 2),
    ("msdnet_imagenet_step6", {}, (3, 224, 224),
     [514.66, 1171.18, 1844.52, 2501.40, 2742.06], [7.08, 15.69, 24.01, 42.19, 56.53], 2),
    ("msdnet_imagenet_step7", {}, (3, 224, 224),
     [615.69, 1436.39, 2283.21, 2967.42, 3253.79], [8.76, 20.15, 31.73, 41.86, 62.31], 2),
    ("msdnet_cifar_anytime", {"num_classes": 100}, (3, 32, 32),
     [15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94], [0.434, 0.877, 1.275, 1.696, 2.178, 2.603, 3.068], 3),
    ("msdnet_cifar_anytime", {"num_classes": 10}, (3, 32, 32),
     [15.13, 25.48, 37.06, 46.28, 57.28, 66.89, 75.86], [0.422, 0.854, 1.240, 1.649, 2.120, 2.534, 2.987], 3),
    ("msdnet_cifar_budget", {"num_classes": 100}, (3, 32, 32),
     [6.86, 14.35, 27.54, 41.71, 58.48], [0.300, 0.650, 1.018, 1.492, 2.079], 3),
]


@pytest.mark.parametrize("name,overrides,shape,macs,params,decimals", PUBLISHED,
                         ids=[f"{p[0]}-{p[1].get('num_classes', 1000)}" for p in PUBLISHED])
def test_published_per_exit_costs(name, overrides, shape, macs, params, decimals):
    costs = count_exit_costs(create_model(name, **overrides), shape)
    assert [round(m, 2) for m in costs.macs_m] == macs
    assert [round(p, decimals) for p in costs.params_m] == params


def test_conv_only_macs_imagenet_step4():
    costs = count_exit_costs(create_model("msdnet_imagenet_step4"), (3, 224, 224))
    assert [round(m / 1e6, 2) for m in costs.conv_macs] == [336.83, 680.89, 1002.54, 1248.20, 1353.62]


def test_costs_are_cumulative_and_total_params_match_model():
    model = create_model("msdnet_tiny")
    costs = count_exit_costs(model, (3, 16, 16))
    assert all(a < b for a, b in zip(costs.macs, costs.macs[1:]))
    assert costs.params[-1] == sum(p.numel() for p in model.parameters())
    assert model.training  # mode restored


def test_rejects_batched_shape():
    with pytest.raises(ValueError, match="batch must be 1"):
        count_exit_costs(create_model("msdnet_tiny"), (2, 3, 16, 16))
