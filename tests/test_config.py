import pytest

from vlcompress.config import Pattern, PruneConfig, check_sparsity, parse_batch_sizes
from vlcompress.errors import ConfigError


def test_pattern_parse():
    assert Pattern.parse("2:4").implied_sparsity == 0.5
    assert Pattern.parse("4:8").n == 4 and str(Pattern.parse("4:8")) == "4:8"
    assert Pattern.parse("Unstructured").kind == "unstructured"
    for bad in ("3:3", "5:4", "0:4", "a:b", "structured?"):
        with pytest.raises(ConfigError):
            Pattern.parse(bad)


def test_prune_config_defaults_and_conflicts():
    assert PruneConfig(pattern="2:4").sparsity == 0.5
    assert PruneConfig(pattern="2:4", sparsity=0.5).sparsity == 0.5
    assert PruneConfig(pattern="unstructured").sparsity == 0.5
    assert PruneConfig(pattern="unstructured", sparsity="0.25").sparsity == 0.25
    with pytest.raises(ConfigError, match="conflicts"):
        PruneConfig(pattern="2:4", sparsity=0.6)
    with pytest.raises(ConfigError, match="unknown method"):
        PruneConfig(method="obs")
    with pytest.raises(ConfigError, match="scope"):
        PruneConfig(scope=("audio",))


@pytest.mark.parametrize("v", ["x", None, 1.0, -0.01, float("nan"), "1e3"])
def test_check_sparsity_rejects(v):
    with pytest.raises(ConfigError, match="sparsity"):
        check_sparsity(v)


def test_batch_sizes():
    assert parse_batch_sizes("1, 8,64") == (1, 8, 64)
    for bad in ("", "0", "1,-2", "a"):
        with pytest.raises(ConfigError):
            parse_batch_sizes(bad)
    from vlcompress.runtime.registry import LatencyConfig

    with pytest.raises(ConfigError):
        LatencyConfig(runtime="tvm")
