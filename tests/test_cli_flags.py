"""`sct train`'s setting flags are generated from TrainConfig's fields; the flags several commands share
(image source, --device, --precision, --workers) come from retrieval.cli_options; no flag of before went away."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from retrieval.cli_options import DEVICES, PRECISIONS
from sct.cli import build_parser
from training.cli import config_flags, overrides_from
from training.config import OPTIMIZERS, TrainConfig, choices_of, resolve_config

#: Every option of every command before the flags were generated (`sct COMMAND --help`, without -h/--help)
FLAGS_BEFORE = {
    "demo": "--augment --data-root --device --epochs --host --index-out --no-serve --port --run",
    "embed": "--batch-size --checkpoint --data-root --dataset --device --images --model --no-progress --out "
    "--precision --shard --split --workers",
    "eval": "--batch-size --data-root --index --json --k --queries-images --queries-split",
    "export": "--checkpoint --out --parity-images",
    "index": "--batch-size --data-root --dataset --images --index-type --merge --model --nlist --nprobe --out "
    "--shard --split --storage --workers",
    "report": "--data-root --device --iterations --max-images --no-model --out --title",
    "search": "--index --k",
    "serve": "--allowed-host --dev-server --host --index --max-upload-mb --port --threads --workers",
    "simulate-gradients": "--entanglement --grid --lam --loss --lr --out --projection --temperature",
    "train": "--arch --augment --batch-size --compile --config --data-root --dataset --device --dim --dist-backend "
    "--embedding-bn --epochs --eval-every --eval-ks --gather-embeddings --hard-floor --hard-threshold "
    "--htl-beta --htl-levels --htl-neighbours --htl-rebuild-every --htl-tree-images-per-class "
    "--image-size --images-per-class --lam --loss --lr --margin --max-iters-per-epoch --no-augment "
    "--no-compile --no-embedding-bn --no-progress --optimizer --out --precision --pretrained --resume "
    "--sct-warm-loss --sct-warmup --seed --sync-bn --temperature --val-by --val-fraction --workers",
}
#: TrainConfig fields that are not generated flags: hand-written (dataset, data_root, out) or no flag at all
NOT_FLAGS = {"dataset", "data_root", "out", "milestones", "mean", "std", "cache_images", "provenance"}
BASE = ["train", "--dataset", "cub", "--data-root", "d", "--out", "o"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("command", sorted(FLAGS_BEFORE))
def test_every_flag_of_before_still_exists(command: str) -> None:
    assert set(FLAGS_BEFORE[command].split()) <= set(_actions(_commands()[command]))


def test_every_setting_meant_as_a_flag_has_one_with_its_type_and_choices() -> None:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(fields) - set(config_flags()) == NOT_FLAGS
    actions = _actions(_commands()["train"])
    for name, flag in config_flags().items():
        action, default = actions[flag], getattr(TrainConfig, name, None)
        assert action.dest == name and action.default is None, flag  # an unset flag overrides nothing
        assert action.help == fields[name].metadata["help"]
        assert (tuple(action.choices) if action.choices else None) == choices_of(name), flag
        if isinstance(default, bool):
            assert isinstance(action, argparse.BooleanOptionalAction) and f"--no-{flag[2:]}" in actions, flag
        elif isinstance(default, float) or fields[name].type == "float | None":
            assert action.type is float, flag
        elif isinstance(default, int) or fields[name].type == "int | None":
            assert action.type("7") == 7, flag
            with pytest.raises((ValueError, argparse.ArgumentTypeError)):  # argparse reports either
                action.type("1.5")
    assert actions["--eval-ks"].nargs == "+" and actions["--eval-ks"].type("3") == 3
    assert actions["--sync-bn"].dest == "sync_batchnorm" and actions["--sct-warmup"].metavar == "SHARE"


def test_each_choice_list_is_the_same_in_the_parser_the_config_and_the_code() -> None:
    from training import distributed, losses, model

    commands = _commands()
    train = _actions(commands["train"])
    assert tuple(train["--loss"].choices) == choices_of("loss") == tuple(losses.LOSSES)
    assert tuple(train["--sct-warm-loss"].choices) == choices_of("sct_warm_loss") == losses.WARM_LOSSES
    assert tuple(train["--arch"].choices) == choices_of("arch") == tuple(model.ARCHS)
    assert tuple(train["--dist-backend"].choices) == choices_of("dist_backend") == distributed.BACKENDS
    for command in ("train", "embed", "demo", "report"):
        assert tuple(_actions(commands[command])["--device"].choices) == DEVICES == choices_of("device"), command
    for command in ("train", "embed"):
        assert tuple(_actions(commands[command])["--precision"].choices) == PRECISIONS == choices_of("precision")
    for name in choices_of("loss"):  # every name builds
        assert isinstance(
            losses.build_loss(name, lam=1.0, temperature=0.1, hard_threshold=None), losses.MinedTripletLoss
        )
    with pytest.raises(ValueError, match="loss must be one of sct, hn, shn, ep, batch-all, htl, not 'nca'"):
        resolve_config("cub", "d", "o", overrides={"loss": "nca"})
    assert tuple(train["--optimizer"].choices) == choices_of("optimizer") == OPTIMIZERS
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw"):
        resolve_config("cub", "d", "o", overrides={"optimizer": "adam"})


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (BASE + ["--loss", "nca"], "--loss"),
        (BASE + ["--device", "tpu"], "--device"),
        (BASE + ["--workers", "-1"], "--workers"),
        (BASE + ["--epochs", "0"], "--epochs"),
        (BASE + ["--images-per-class", "1"], "--images-per-class"),
        (BASE + ["--eval-ks", "0"], "--eval-ks"),
        (["embed", "--checkpoint", "c", "--model", "m", "--images", "i", "--out", "o", "--workers", "-1"], "--workers"),
        (["index", "--model", "m", "--images", "i", "--out", "o", "--workers", "-2"], "--workers"),
        (["serve", "--index", "x", "--workers", "-1"], "--workers"),
        (["demo", "--device", "tpu"], "--device"),
    ],
)
def test_a_bad_choice_or_a_negative_count_is_a_usage_error_naming_the_flag(argv, flag, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_workers_may_be_0_everywhere() -> None:
    parser = build_parser()
    assert parser.parse_args(BASE + ["--workers", "0"]).workers == 0
    assert parser.parse_args(["index", "--model", "m", "--images", "i", "--out", "o", "--workers", "0"]).workers == 0
    assert parser.parse_args(["serve", "--index", "x"]).workers == 1


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {}),
        (["--embedding-bn"], {"embedding_bn": True}),
        (["--no-embedding-bn"], {"embedding_bn": False}),
        (["--eval-ks", "1", "5"], {"eval_ks": [1, 5]}),
        (["--sct-warmup", "0"], {"sct_warmup": 0.0}),
        (["--no-sync-bn", "--gather-embeddings"], {"sync_batchnorm": False, "gather_embeddings": True}),
        (["--hard-floor", "0.5", "--schedule", "cosine"], {"hard_floor": 0.5, "schedule": "cosine"}),
    ],
)
def test_parsed_flags_are_the_overrides_and_win_over_presets(flags, expected) -> None:
    overrides = overrides_from(build_parser().parse_args(BASE + ["--pretrained", "none", *flags]))
    assert set(overrides) == set(config_flags())
    assert {k: v for k, v in overrides.items() if v is not None} == {"pretrained": "none", **expected}
    config = resolve_config("cub", "d", "o", overrides=overrides)
    preset = resolve_config("cub", "d", "o", overrides={"pretrained": "none"})
    assert (preset.embedding_bn, preset.sct_warmup) == (True, 1.0)  # what start:none gives, which the flags beat
    for name, value in expected.items():
        assert getattr(config, name) == value and config.provenance[name] == "flag", name
    for name in set(config_flags()) - set(expected) - {"workers"}:
        assert getattr(config, name) == getattr(preset, name), name
