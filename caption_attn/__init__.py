"""caption_attn: image captioning with visual attention (Show, Attend and Tell) in Keras 3.

The flow of artefacts, one module per arrow (the README's code map has the whole picture):
caption file -> records (`data`) -> split and vocabulary (`data`, `vocab`) -> feature cache
(`images`, `backbone`, `extract`, `feature_cache`, `feature_index`) -> tf.data batches
(`train_data`, `pipeline`) -> model (`model`, `recurrence`) trained by `train` (`steps`,
`optimizer`, `scst` + `cider` for self-critical epochs, `validation`, `callbacks`) -> run
folder (`run`)
-> best.keras -> captions (`captioner`, `decode`) -> metrics (`coco_metrics`,
`shapes_metrics`, `evaluate`) or a SavedModel / TFLite model (`export`).
Start reading at `cli` (the commands), then `demo.run_demo`.
"""

__version__ = "0.1.0"
