"""run_server's flags come from ServerConfig: one place for each default and help text."""

from __future__ import annotations

import dataclasses

import pytest

from petals_like.cli.run_server import parse_args
from petals_like.config import ServerConfig


def test_defaults_are_the_config_defaults():
    config, _ = parse_args(["m"])
    expected = ServerConfig(model="m")
    for f in dataclasses.fields(ServerConfig):
        if f.name != "relay_limits":  # a fresh RelayLimits of the same values
            assert getattr(config, f.name) == getattr(expected, f.name), f.name
    assert config.relay_limits == expected.relay_limits


def test_flags_reach_their_fields():
    argv = ["m", "--num_blocks", "3", "--wire_formats", "int8", "float16", "--share_prefix_cache", "--throughput", "12.5",
            "--adapters", "a", "b=/tmp/b", "--max_cache_share", "0.3", "--initial_peers", "/ip4/10.0.0.1/tcp/1/p2p/Qm",
            "--torch_dtype", "bfloat16", "--port", "4001", "--no_progress", "--no_relay"]  # fmt: skip
    config, _ = parse_args(argv)
    assert (config.num_blocks, config.wire_formats, config.share_prefix_cache, config.throughput) == (
        3,
        ("int8", "float16"),
        True,
        12.5,
    )
    assert config.adapters == ("a", "b=/tmp/b") and config.max_cache_share == 0.3 and config.torch_dtype == "bfloat16"
    assert config.initial_peers == ("/ip4/10.0.0.1/tcp/1/p2p/Qm",) and config.port == 4001
    assert config.progress is False and config.relay_limits is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["m", "--block_indices", "0:2", "--num_blocks", "2"], "not allowed with argument"),
        (["m", "--throughput", "fast"], "expected auto, eval or a positive number"),
        (["m", "--quant_type", "int3"], "invalid choice"),
    ],
)
def test_bad_flags_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
