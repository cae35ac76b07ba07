"""Every pipeline profile loads, and every training profile it names exists and validates."""

from __future__ import annotations

import pytest

from flows.config import PROFILES, PipelineConfig, load_profile
from lvdflow.errors import UserError
from pretrain.config import load_config, profile_path
from pretrain.distill.config import load_distill_config


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES.glob("*.yaml")))
def test_profile_and_the_training_configs_it_names(name):
    cfg = load_profile(name)
    assert isinstance(cfg, PipelineConfig)
    load_config(profile_path(cfg.pretrain.config), cfg.pretrain.overrides).validate()
    load_config(profile_path(cfg.embed.bootstrap_config), cfg.embed.bootstrap_overrides).validate()
    load_distill_config(profile_path(cfg.distill.config), cfg.distill.overrides)


def test_overrides_merge_field_by_field_and_are_checked():
    cfg = load_profile("local", {"dedup": {"threshold": 0.5}})
    assert cfg.dedup.threshold == 0.5 and cfg.dedup.descriptor == "builtin"  # the rest of dedup kept
    with pytest.raises(UserError, match="dedup.thresh"):
        load_profile("local", {"dedup": {"thresh": 0.5}})
    with pytest.raises(UserError, match="no profile"):
        load_profile("no-such-profile")


@pytest.mark.parametrize("override, field", [
    ({"shard": {"max_count": 0}}, "shard.max_count"), ({"shard": {"workers": 0}}, "shard.workers"),
    ({"retrieve": {"n_clusters": 0}}, "retrieve.n_clusters"),
    ({"retrieve": {"sample_threshold": -1}}, "retrieve.sample_threshold"),
])
def test_counts_below_one_are_refused_at_load_as_on_the_command_line(override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_profile("local", override)


def test_refresh_names_the_cached_stages_and_nothing_else():
    from flows.caching import CODE_VERSION
    from flows.config import STAGE_NAMES, check_refresh

    assert set(STAGE_NAMES) == set(CODE_VERSION)  # every versioned stage task can be refreshed, by that name
    assert check_refresh(["dedup", "embed"]) == ["dedup", "embed"] and check_refresh(None) == []
    with pytest.raises(UserError, match="no stage named embd"):
        check_refresh(["embd", "dedup"])
