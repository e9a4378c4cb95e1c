"""Raw (unnormalised) CLIP image and text features from an open_clip model."""

from __future__ import annotations

import numpy as np


def image_features(embedder, images) -> np.ndarray:
    """(n, d) float32 raw image features, one batch exactly as given (batch layout is recorded)."""
    import torch

    x = torch.stack([embedder.preprocess(im) for im in images]).to(embedder.device)
    with torch.no_grad():
        f = embedder.model.encode_image(x, normalize=False)
    return f.float().cpu().numpy().astype(np.float32)


def text_features(embedder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(n, d) float32 raw text features."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        tok = embedder.tokenizer(texts[i : i + batch_size]).to(embedder.device)
        with torch.no_grad():
            out.append(embedder.model.encode_text(tok, normalize=False).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)
