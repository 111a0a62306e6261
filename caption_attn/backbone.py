"""The InceptionV3 backbone and the feature grid it produces.

The grid is defined here once: every other module (cache, model, plots, metrics, export) reads
these constants instead of repeating 8, 64 or 2048.
"""

IMAGE_SIZE = 299                        # InceptionV3's native input side (pixels)
GRID = 8                                # the `mixed10` map is GRID x GRID positions
NUM_PIXELS = GRID * GRID                # 64 attention positions, row-major: p = row * 8 + col
FEATURE_DIM = 2048                      # channels of `mixed10`
FEATURE_SHAPE = (NUM_PIXELS, FEATURE_DIM)  # one cached feature file
