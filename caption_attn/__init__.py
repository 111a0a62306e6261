"""caption_attn: image captioning with visual attention (Show, Attend and Tell) in Keras 3."""

__version__ = "0.1.0"
