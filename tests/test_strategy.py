"""`--strategy` checks that need no cluster: TF_CONFIG is checked before the run folder is
touched, with messages naming it; `mirrored` on one device says it trains one replica."""

import json
import os

import pytest

from caption_attn import distribute
from caption_attn.errors import UserError

GOOD = {"cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("tf_config, expected", [
    ("{bad", r"TF_CONFIG environment variable is not JSON"),
    ("[]", r"TF_CONFIG environment variable is a JSON list, not an object"),
    ("{}", r"TF_CONFIG has no \"cluster\".*would train alone"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), r"TF_CONFIG has no \"cluster\""),
    (json.dumps({"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker",
                                                                   "index": 0}}),
     r"the TF_CONFIG cluster has one process"),
    (json.dumps({"cluster": GOOD["cluster"]}), r"TF_CONFIG's \"task\" must name"),
    (json.dumps({**GOOD, "task": {"type": "worker", "index": 2}}),
     r"TF_CONFIG's \"task\" must name"),
    (json.dumps({**GOOD, "task": {"type": "evaluator", "index": 0}}),
     r"TF_CONFIG's \"task\" must name"),
    (json.dumps({"cluster": {**GOOD["cluster"], "ps": ["localhost:3"]},
                 "task": GOOD["task"]}), r"may hold one \"chief\" and \"worker\"s"),
])
def test_a_malformed_tf_config_is_refused_naming_it(tf_config, expected):
    # TensorFlow raised JSONDecodeError / ValueError / KeyError tracebacks for these, and
    # trained alone as a single worker with {} or a TF_CONFIG without a cluster
    with pytest.raises(UserError, match=r"^--strategy multi-worker: .*" + expected):
        distribute.check_strategy("multi-worker", {"TF_CONFIG": tf_config})


def test_a_well_formed_tf_config_passes():
    distribute.check_strategy("multi-worker", {"TF_CONFIG": json.dumps(GOOD)})
    distribute.check_strategy("multi-worker", {"TF_CONFIG": json.dumps(
        {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief",
                                                                   "index": 0}})})
    distribute.check_strategy("default", {})


def test_train_checks_tf_config_before_touching_the_run(tmp_path, monkeypatch):
    """Checked in Trainer, after --fresh had deleted the previous run's files."""
    from caption_attn import train
    from caption_attn.config import RunConfig, TrainConfig
    monkeypatch.setenv("TF_CONFIG", "{}")
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "history.json").write_text("[]")
    cfg = RunConfig(captions=str(tmp_path / "c.json"), cache=str(tmp_path / "cache"),
                    train=TrainConfig(strategy="multi-worker", fresh=True))
    with pytest.raises(UserError, match="TF_CONFIG has no"):
        train.train(cfg, str(run), log=lambda m: None)
    assert os.listdir(run) == ["history.json"]


def test_mirrored_on_one_device_says_it_trains_one_replica():
    import tensorflow as tf
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    [note] = distribute.strategy_notes("mirrored", strategy)
    assert "--strategy mirrored found one device" in note and "one replica" in note
    assert distribute.strategy_notes("default", tf.distribute.get_strategy()) == []


def test_xla_with_several_replicas_says_it_is_not_applied():
    # Steps.compile leaves XLA out with more than one replica, silently until now
    class Two:
        num_replicas_in_sync = 2
    [note] = distribute.strategy_notes("multi-worker", Two(), xla=True)
    assert note.startswith("--xla is not applied with 2 replicas")
    assert distribute.strategy_notes("multi-worker", Two(), xla=False) == []


@pytest.mark.parametrize("name", ["default", "mirrored"])
def test_a_cluster_in_tf_config_without_multi_worker_is_refused(name):
    # every worker launched with the cluster's TF_CONFIG but without --strategy multi-worker
    # trained alone, all of them writing the same run folder as its chief
    with pytest.raises(UserError, match=rf"^--strategy {name}: the TF_CONFIG environment "
                                        r"variable describes a cluster of 2 processes"):
        distribute.check_strategy(name, {"TF_CONFIG": json.dumps(GOOD)})
    for harmless in ("{bad", "{}", json.dumps({"cluster": {"worker": ["a:1"]}})):
        distribute.check_strategy(name, {"TF_CONFIG": harmless})
