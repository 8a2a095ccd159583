"""run_server accepts Petals' run_server flag names (cli/petals_flags.py): mapped, ignored with a warning, or refused."""

from __future__ import annotations

import logging
import re

import pytest

from petals_like.cli.petals_flags import IGNORE, MAP, PETALS_FLAGS, REFUSE
from petals_like.cli.run_server import parse_args

PEER = "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer"


@pytest.mark.parametrize(
    "petals, ours",
    [
        (
            ["--converted_model_name_or_path", "m", "--attn_cache_tokens", "4096", "--inference_max_length", "2048"],
            ["m", "--kv_cache_tokens", "4096", "--max_session_length", "2048"],
        ),
        (
            ["m", "--mean_balance_check_period", "60", "--step_timeout", "300", "--update_period", "20"],
            ["m", "--balance_period", "60", "--session_idle_timeout", "300", "--announce_period", "20"],
        ),
        (["m", "--new_swarm", "--no_auto_relay"], ["m", "--max_relays", "0"]),
        (["m", "--prefix", "bloom", "--alloc_timeout", "5"], ["m", "--dht_prefix", "bloom", "--max_alloc_timeout", "5"]),
        (["m", "--load_in_8bit", "True"], ["m", "--quant_type", "int8"]),
        (["m", "--quant_type", "nf4", "--load_in_8bit", "False"], ["m", "--quant_type", "none"]),  # the last one wins
        (  # names that are the same in both
            [
                "m",
                "--num_blocks",
                "4",
                "--initial_peers",
                PEER,
                "--port",
                "31330",
                "--public_ip",
                "1.2.3.4",
                "--throughput",
                "eval",
                "--torch_dtype",
                "bfloat16",
                "--device",
                "cpu",
                "--identity_path",
                "id.key",
                "--public_name",
                "me",
                "--balance_quality",
                "0.5",
                "--request_timeout",
                "60",
                "--expiration",
                "120",
                "--adapters",
                "lora1",
            ],
            None,
        ),  # fmt: skip
        (  # a typical Petals volunteer's line, including flags that are ignored here
            [
                "--converted_model_name_or_path",
                "m",
                "--block_indices",
                "0:8",
                "--new_swarm",
                "--num_handlers",
                "16",
                "--compression",
                "FLOAT16",
                "--use_auth_token",
                "--increase_file_limit",
                "--torch_dtype",
                "float16",
            ],
            ["m", "--block_indices", "0:8", "--torch_dtype", "float16"],
        ),  # fmt: skip
    ],
)
def test_petals_names_give_the_same_config_as_ours(petals, ours):
    petals_config, _ = parse_args(petals)
    ours_config, _ = parse_args(petals if ours is None else ours)
    assert petals_config == ours_config


def test_update_period_longer_than_our_expiration_keeps_petals_expiration():
    """Petals' records live 2 x --update_period unless --expiration is given; ours default to 90 s."""
    config, _ = parse_args(["m", "--update_period", "120"])
    assert (config.announce_period, config.expiration) == (120.0, 240.0)
    config, _ = parse_args(["m", "--update_period", "60", "--expiration", "300"])
    assert (config.announce_period, config.expiration) == (60.0, 300.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["m", "--new_swarm", "--initial_peers", PEER], "argument --new_swarm: not allowed with argument --initial_peers"),
        (["m", "--initial_peers", PEER, "--new_swarm"], "argument --new_swarm: not allowed with argument --initial_peers"),
        (["m", "--converted_model_name_or_path", "m"], "--converted_model_name_or_path: not allowed with the positional MODEL"),
        (["--num_blocks", "2"], "required: model (or --converted_model_name_or_path)"),
        (["m", "--tensor_parallel_devices", "cuda:0", "cuda:1"], "argument --tensor_parallel_devices: a Petals flag not"),
        (["m", "--custom_module_path", "x"], "argument --custom_module_path: a Petals flag not supported here"),
        (["m", "--attn_cache_size", "2GB"], "argument --attn_cache_size: a Petals flag not supported here"),
        (["m", "-c", "config.yml"], "argument -c: a Petals flag not supported here"),
        (["m", "--attn_cache_tokens", "lots"], "argument --attn_cache_tokens: invalid int value"),
        (["m", "--update_period", "4000"], "need 0 < announce_period < expiration"),
    ],
)
def test_refused_and_conflicting_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_ignored_flags_warn_by_name(caplog):
    with caplog.at_level(logging.WARNING, logger="petals_like.cli.petals_flags"):
        config, _ = parse_args(["m", "--num_handlers", "8", "--use_auth_token", "--max_chunk_size_bytes", "1000"])
    assert config == parse_args(["m"])[0]
    text = caplog.text
    for name in ("--num_handlers", "--use_auth_token", "--max_chunk_size_bytes"):
        assert f"Ignoring the Petals flag {name}:" in text
    # --token is a flag of ours (the hub's access token): used, never shown
    config, _ = parse_args(["m", "--token", "hf_secret"])
    assert config.token == "hf_secret" and "hf_secret" not in repr(config)


def test_every_table_entry_is_accepted_and_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    usage, _, sections = out.partition("Petals flag names:")
    assert sections, "no Petals section in --help"
    for entry in PETALS_FLAGS:
        assert entry.does in (MAP, IGNORE, REFUSE)
        flag = re.compile(rf"--{entry.name}\b(?!_)")
        assert flag.search(sections) and not flag.search(usage.split("\n\n")[0]), entry.name
