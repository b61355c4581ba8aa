"""InstantID (identity-preserving SDXL) that fits a free Colab T4, plus a ConvNeXtPose benchmark."""

__version__ = "0.1.0"
