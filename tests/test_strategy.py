"""`--strategy` checks that need no cluster: TF_CONFIG is checked before the run folder is
touched, with messages naming it; `mirrored` on one device says it trains one replica."""

import json
import os
import types

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
    # a list or an object: a TypeError traceback (unhashable, looked up in the cluster)
    (json.dumps({**GOOD, "task": {"type": ["worker"], "index": 0}}),
     r"TF_CONFIG's \"task\" must name"),
    (json.dumps({**GOOD, "task": {"type": {"worker": 0}, "index": 0}}),
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


class _TwoWorkers:
    """The replica context of this worker in a cluster of two whose other worker holds
    `other(value)` where this one holds `value`: `check_workers_agree`'s two all-reduces, the
    mean, then the sum of the squared distances to it."""

    def __init__(self, other):
        self.other = other

    def all_reduce(self, op, value):
        import tensorflow as tf
        if op == "mean":
            self.mine, self.mean = value, (value + self.other(value)) / 2
            return self.mean
        return value + tf.square(self.other(self.mine) - self.mean)


class _Cluster:
    """A strategy of a cluster (`distribute._cluster`) whose `run` is this worker's."""
    cluster_resolver = types.SimpleNamespace(cluster_spec=lambda: types.SimpleNamespace(
        as_dict=lambda: {"worker": ["a:1", "b:1"]}))

    def run(self, fn):
        return fn()

    def experimental_local_results(self, value):
        return (value,)


def test_workers_are_told_which_of_their_settings_or_data_differ(monkeypatch):
    """Only the flags were compared, as one digest: workers with other data trained together
    (test_distributed.py), and a refusal could not say what differed."""
    import tensorflow as tf
    agree = {"flags": "a" * 64, "vocabulary": "b" * 64, "feature cache": "c" * 16}
    size = 1 + 4 * len(agree)   # the step, then four 16-bit numbers of each digest

    def check(*other, step=None):
        """`check_workers_agree` where the other worker's numbers differ at `other`."""
        moved = tf.reduce_sum(tf.one_hot(list(other), size, dtype=tf.float64), 0) if other \
            else tf.zeros([size], tf.float64)
        monkeypatch.setattr(tf.distribute, "get_replica_context",
                            lambda: _TwoWorkers(lambda value: value + moved))
        distribute.check_workers_agree(_Cluster(), step, "ckpt-3", "run/checkpoints", agree)

    check()
    with pytest.raises(UserError, match=r"^the workers were started with other settings or "
                                        r"data: they differ in their vocabulary \(this "
                                        r"worker's: vocabulary sha256 bbbbbbbbbbbb…\); every "
                                        r"worker must run the same `caption-attn train`"):
        check(1 + 4 + 3)          # the last 16 bits of the vocabulary's digest
    with pytest.raises(UserError, match=r"they differ in their flags, feature cache \(this "
                                        r"worker's: flags sha256 aaaaaaaaaaaa…, feature cache "
                                        r"sha256 cccccccccccc…\)"):
        check(1, 1 + 8)
    with pytest.raises(UserError, match=r"^the workers restored different checkpoints \(this "
                                        r"worker: step 3 from ckpt-3"):
        check(0, step=3)
    check(0)                      # no step given: not compared
