"""TrainConfig: dataset defaults, milestone rounding, flag validation."""
import pytest

from imta_fast.train.config import ConfigError, parse_train_args


def test_dataset_defaults_and_imagenet_recipe():
    cfg = parse_train_args(["--dataset", "imagenet", "--epochs", "90"])
    assert (cfg.model, cfg.holdout_size, cfg.temperature, cfg.gamma) == ("msdnet_imagenet_step4", 50000, 1.0, 0.1)
    assert cfg.milestone_epochs() == (30, 60)


@pytest.mark.parametrize("epochs,expected", [(300, (150, 225)), (10, (5, 8)), (5, (3, 4))])
def test_cifar_rule_decays_at_first_epoch_reaching_the_fraction(epochs, expected):
    # reference: lr x0.1 when epoch >= 0.5*E, x0.01 when epoch >= 0.75*E
    assert parse_train_args(["--epochs", str(epochs)]).milestone_epochs() == expected


@pytest.mark.parametrize("argv,needle", [(["--method", "imta"], "--teacher"), (["--epochs", "0"], "--epochs"),
                                         (["--data-backend", "dali"], "--dataset imagenet")])
def test_bad_flags(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_train_args(argv)
