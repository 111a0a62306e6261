import json
import os
import shutil
import sys

import pytest

# TensorFlow's C++ banner and oneDNN notices only add noise to test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# oneDNN on or off as the CLI chooses it (`quiet.import_tensorflow`), before any test module
# imports TensorFlow: on an AVX2-only CPU the suite ran on Eigen while the CLI does not.
if "tensorflow" not in sys.modules:
    from caption_attn.quiet import onednn_on_avx2_cpus
    onednn_on_avx2_cpus()
    ONEDNN_CHOSEN_BEFORE_TENSORFLOW = "tensorflow" not in sys.modules

SHAPES_IMAGES = 40

# Seconds each heavy test file takes (`make test`, per file the sum of its tests' times in
# `--junitxml`; the others take under 12 s). `make test` runs files in this order, heaviest
# first, with xdist's `--dist loadfile --no-loadscope-reorder`, so the two workers end
# together: in xdist's own order (files with more tests first) the heavy files with few tests
# came last, and one worker idled for 70 s of a 414 s run while the other ran the last of
# them. Measured again as the suite grew: stop 79, 1659 tests on the Intel Xeon model 106
# (1963 s in all; test_ema.py, missing before, had run among the last files at 77 s); stop
# 80: test_train_scst.py and test_coco_metrics.py from that stop's run; stop 84:
# test_quiet.py, and test_fused.py with the 6 s of the test it added after that run.
FILE_SECONDS = {"test_train.py": 383, "test_train_scst.py": 250, "test_export.py": 156,
                "test_distributed.py": 127, "test_captioner.py": 121, "test_faults.py": 101,
                "test_extract.py": 96, "test_backbone.py": 95, "test_benchmarks.py": 93,
                "test_ema.py": 77, "test_kill_resume.py": 73, "test_signals.py": 68,
                "test_coco_metrics.py": 30, "test_evaluate_run.py": 50,
                "test_train_tensorboard.py": 48, "test_demo.py": 48, "test_quiet.py": 45,
                "test_graph_images.py": 32, "test_decode.py": 27, "test_pipeline.py": 25,
                "test_feature_cache.py": 23, "test_model.py": 17, "test_best_files.py": 14,
                "test_fused.py": 56}


@pytest.fixture(scope="session", autouse=True)
def reuse_random_backbones():
    """`Backbone.from_manifest` of a random backbone's cache gives, per test process, one
    Backbone per weights file content and manifest settings: every `caption`, `evaluate`,
    `export` and rerun of `extract-features` rebuilt the same InceptionV3 (build, load and
    check the weights, fold the batch norms, trace: ~3 s each on 2 cores).

    Only what the real call already returned is reused, for a weights file of the same bytes
    (sha256) and the same manifest fields the call reads: a damaged, missing or replaced
    weights file, an edited manifest or imagenet weights go through the real call (and its
    refusals). The real call runs once per key, so its own code is still tested."""
    from caption_attn import backbone, feature_cache
    from caption_attn.backbone import Backbone
    from caption_attn.fileio import file_digest

    real = Backbone.from_manifest.__func__
    built = {}

    def from_manifest(cls, cache_dir, jit_compile=False):
        try:
            m = feature_cache.read_manifest(cache_dir)
            digest = file_digest(os.path.join(cache_dir, m["weights_file"]))
            key = (cls, digest, bool(jit_compile), json.dumps(
                [m[k] for k in ("weights", "seed", "precision", "weights_file",
                                "weights_sha256", "feature_scale")]
                + [m.get(k) for k in feature_cache.IMAGES_TO_FEATURES]))   # its refusal's
        except Exception:                                      # the real call says what
            return real(cls, cache_dir, jit_compile)
        # imagenet weights, or a precision the real call refuses under oneDNN's cap
        if m["weights"] != "random" or backbone.onednn_aborts_on(m["precision"]):
            return real(cls, cache_dir, jit_compile)
        if key not in built:
            if len(built) >= 3:                                # memory: ~200 MB each
                built.pop(next(iter(built)))
            built[key] = real(cls, cache_dir, jit_compile)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Backbone, "from_manifest", classmethod(from_manifest))
        yield


def pytest_collection_modifyitems(items):
    """Heaviest files first (a stable sort: each file's tests keep their order). Tests marked
    `precision(P)` are skipped where P's ops would abort the test process: oneDNN capped
    below P (`ONEDNN_MAX_CPU_ISA=AVX2`, as the README imitates an AVX2-only CPU) on a CPU
    where TensorFlow hands P to oneDNN (`backbone.onednn_aborts_on`). One such abort took a
    pytest worker down, and after a few xdist stopped the whole run."""
    from caption_attn.backbone import onednn_aborts_on

    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))
    for item in items:
        for mark in item.iter_markers("precision"):
            cap = onednn_aborts_on(mark.args[0])
            if cap:
                item.add_marker(pytest.mark.skip(
                    reason=f"computes in {mark.args[0]}, which oneDNN capped at {cap} "
                           f"(ONEDNN_MAX_CPU_ISA) cannot run on this CPU"))


@pytest.fixture
def onednn_capped_below(monkeypatch):
    """`onednn_capped_below(P)`: from then on oneDNN counts as capped at AVX2 below P's
    kernels (`backbone.onednn_aborts_on`, tested on its own in test_backbone.py), whatever
    CPU runs the test, for the commands' refusals; nothing is capped for real."""
    from caption_attn import backbone

    def cap(precision):
        monkeypatch.setattr(backbone, "onednn_aborts_on",
                            lambda p, *a, **k: "AVX2" if p == precision else "")
    return cap


@pytest.fixture
def no_locks(monkeypatch):
    """From then on every flock fails with ENOLCK but unlocking, as on an NFS mount with
    `nolock`."""
    import errno
    import fcntl

    real = fcntl.flock

    def flock(fd, operation):
        if operation & fcntl.LOCK_UN:
            return real(fd, operation)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A small shapes dataset and its random-backbone feature cache (float16 files, computed
    in float32: the same on every CPU, and fast on AVX2-only ones, where bfloat16 is emulated).

    Returns dict(root, images, captions, cache). Shared by the train / caption / evaluate
    tests; tests that modify it must work on a copy (`copy_cache`).
    """
    from caption_attn import extract, shapes
    from caption_attn.config import ExtractConfig, ShapesConfig

    root = tmp_path_factory.mktemp("shapes_data")
    summary = shapes.make_shapes(str(root / "shapes"), ShapesConfig(
        num_images=SHAPES_IMAGES, seed=0, val_fraction=0.2, test_fraction=0.2))
    cache = str(root / "cache")
    extract.extract_features(summary["images_dir"], ExtractConfig(
        cache=cache, weights="random", dtype="float16", precision="float32", batch_size=20),
        progress=False)
    return {"root": str(root), "images": summary["images_dir"],
            "captions": summary["captions"], "cache": cache}


@pytest.fixture
def copy_cache(shapes_data, tmp_path):
    """A private copy of the shared feature cache (for tests that damage it)."""
    target = str(tmp_path / "cache")
    shutil.copytree(shapes_data["cache"], target)
    return target


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of `trained_run` (for tests that edit or damage it), as a RunFolder."""
    from caption_attn.run import RunFolder
    target = str(tmp_path / "run")
    shutil.copytree(trained_run, target)
    return RunFolder(target)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """A folder of sample images in many formats, good and bad (tests/image_samples.py)."""
    from image_samples import make_images

    root = tmp_path_factory.mktemp("images")
    make_images(root)
    return str(root)


@pytest.fixture(scope="session")
def extracted(images, tmp_path_factory):
    """One float16 extraction of GOOD + BAD keys into a session cache: (cache, summary).

    Shared by the backbone, cache and extract tests; tests that change a cache work on a copy
    (`cache_copy`)."""
    from caption_attn.extract import extract_features
    from caption_attn.images import list_images
    from image_samples import extract_cfg

    cache = tmp_path_factory.mktemp("cache")
    keys = list_images(images) + ["missing.jpg"]
    summary = extract_features(images, extract_cfg(cache), keys=keys, progress=False)
    return str(cache), summary


@pytest.fixture(scope="session")
def backbone(extracted):
    """The backbone that made `extracted`, rebuilt from its manifest."""
    from caption_attn.backbone import Backbone

    return Backbone.from_manifest(extracted[0])


@pytest.fixture
def cache_copy(extracted, tmp_path):
    """A private copy of the `extracted` cache."""
    path = tmp_path / "cache"
    shutil.copytree(extracted[0], path)
    return str(path)


@pytest.fixture(scope="session")
def trained_run(shapes_data, tmp_path_factory):
    """A small run trained for 3 epochs on `shapes_data` (its folder path)."""
    from caption_attn import train
    from caption_attn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, VocabConfig

    run = str(tmp_path_factory.mktemp("trained") / "run")
    cfg = RunConfig(captions=shapes_data["captions"], cache=shapes_data["cache"],
                    data=DataConfig(seed=1), vocab=VocabConfig(max_length=20),
                    model=ModelConfig(embedding_dim=32, units=64, dropout=0.1),
                    train=TrainConfig(epochs=3, batch_size=16, learning_rate=1e-2,
                                      sample_images=1))
    train.train(cfg, run, progress=False, log=lambda *a: None)
    return run


def file_mtimes(folder) -> dict:
    """{path: mtime} of every file under `folder` (hidden ones too): what a command wrote."""
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(folder) for n in names}


def shapes_csv(shapes_data, path, again=lambda rows: []) -> list:
    """`shapes_data`'s captions as a CSV caption file at `path` (`image,caption` rows, as
    Kaggle's Flickr8k captions.txt), with the rows `again(rows)` written a second time at its
    end. Returns the rows [(image, caption)] before those."""
    from caption_attn import data as data_lib
    records = data_lib.load_captions(shapes_data["captions"]).records
    rows = [(r.image, c) for r in records for c in r.captions]
    path.write_text("image,caption\n" + "".join(f'{i},"{c}"\n' for i, c in rows + again(rows)))
    return rows


def give_other_images(cache: str, keys) -> None:
    """Make `keys`' feature files of `cache` look extracted from other images (their index
    entries' image sha256 changed): the cache of another dataset with the same file names."""
    index = os.path.join(cache, "index.jsonl")
    with open(index) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    for e in entries:
        if e["key"] in keys:
            e["image_sha256"] = "0" * 64
    with open(index, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)


@pytest.fixture
def no_java(monkeypatch):
    """Metrics as on a machine without Java: no METEOR (its JVM loads paraphrase tables, 8-10 s
    a run on 2 cores) and the Python tokenizer. For tests that check nothing METEOR or the Java
    tokenizer change; METEOR itself is compared with pycocoevalcap in test_coco_metrics.py and
    test_evaluate_run.py."""
    from caption_attn import coco_metrics
    monkeypatch.setattr(coco_metrics, "java_available", lambda: False)


@pytest.fixture
def default_sigint():
    """Ctrl-C raising KeyboardInterrupt, as in a terminal (pytest-xdist's workers, `make
    test`, ignore SIGINT: the held signals would be ignored ones)."""
    import signal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
