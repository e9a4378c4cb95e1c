"""Models: the embedded tiny models built from code, and loaders for real checkpoints.

Both go through the same classes and loading paths (diffusers ``from_pretrained`` /
``from_single_file``, open_clip ``create_model_and_transforms``).
"""
