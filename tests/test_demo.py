import json
import os

import pytest

from caption_attn import demo
from caption_attn.config import DemoConfig


@pytest.mark.slow
def test_demo_end_to_end_on_a_reduced_size(tmp_path):
    lines = []
    cfg = DemoConfig(workdir=str(tmp_path / "work"), num_images=150, epochs=4, show=2, beam=2)
    out = demo.run_demo(cfg, log=lines.append)
    paths = out["paths"]
    for name in ("config.json", "vocab.json", "split.json", "history.json", "best.keras"):
        assert os.path.isfile(os.path.join(paths["run"], name)), name
    with open(os.path.join(paths["cache"], "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["count"] == 150 and manifest["weights"] == "random"
    assert len(os.listdir(paths["heatmaps"])) == 2
    assert os.listdir(os.path.join(paths["run"], "logs", "validation"))
    metrics = out["metrics"]
    with open(metrics["metrics_file"]) as f:
        assert json.load(f)["images"] == metrics["images"] == 15
    # above chance: random words score ~0 BLEU-4 and name no scene right
    assert metrics["Bleu_4"] > 0.3
    assert metrics["CIDEr"] > 0.5
    assert metrics["scene_accuracy"] is not None and metrics["grounding"] is not None
    text = "\n".join(lines)
    for expected in ("tensorboard --logdir", "heatmaps:", "best model:", "BLEU-4",
                     "Captions for image"):
        assert expected in text

    # a rerun reuses the dataset, the cache and the finished run
    lines.clear()
    again = demo.run_demo(cfg, log=lines.append)
    assert "reusing" in "\n".join(lines)
    assert again["metrics"]["Bleu_4"] == pytest.approx(metrics["Bleu_4"])
