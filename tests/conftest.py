import os

# TensorFlow's C++ banner and oneDNN notices only add noise to test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
