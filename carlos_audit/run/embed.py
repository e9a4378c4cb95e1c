"""Raw (unnormalised) CLIP image and text features from an open_clip model, or from a transformers
CLIPModel exactly as the CARLoS reference computes them (``CLIPProcessor`` output into
``get_image_features`` / ``get_text_features``)."""

from __future__ import annotations

import numpy as np

from carlos_audit.errors import AuditError


def image_features(embedder, images) -> np.ndarray:
    """(n, d) float32 raw image features, one batch exactly as given (batch layout is recorded)."""
    import torch

    dtype = next(embedder.model.parameters()).dtype  # pinned at load (models/pinned.EMBEDDER_DEFAULTS)
    if embedder.kind == "hf-transformers":
        inputs = embedder.preprocess(images=list(images), return_tensors="pt", padding=True).to(embedder.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            return _projected(embedder.model.get_image_features(**inputs))
    x = torch.stack([embedder.preprocess(im) for im in images]).to(embedder.device, dtype=dtype)
    with torch.no_grad():
        f = embedder.model.encode_image(x, normalize=False)
    return f.float().cpu().numpy().astype(np.float32)


def text_features(embedder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(n, d) float32 raw text features."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        if embedder.kind == "hf-transformers":
            inputs = embedder.preprocess(text=texts[i : i + batch_size], return_tensors="pt", truncation=True,
                                         padding=True).to(embedder.device)
            with torch.no_grad():
                out.append(_projected(embedder.model.get_text_features(**inputs)))
            continue
        tok = embedder.tokenizer(texts[i : i + batch_size]).to(embedder.device)
        with torch.no_grad():
            out.append(embedder.model.encode_text(tok, normalize=False).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _projected(out) -> np.ndarray:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected feature;
    transformers 4 (the reference's era) returned that tensor itself."""
    import torch

    f = out if torch.is_tensor(out) else out.pooler_output
    return f.float().cpu().numpy().astype(np.float32)


def store_text_features(store, embedder, prompts) -> dict:
    """Raw text features of each prompt as the user wrote it (no trigger words), one file per
    prompt under embeddings/text/ (the prompt-override indicator reads them). Returns
    {prompt id: {path, sha256}} for the manifest's ``text_features``."""
    from carlos_audit.hashing import sha256_bytes
    from carlos_audit.casefolder.unit_store import npy_bytes

    feats = text_features(embedder, [p.text for p in prompts])
    records = {}
    for p, f in zip(prompts, feats):
        data = npy_bytes(f)
        rel = f"embeddings/text/{p.id}.npy"
        store.write_file(rel, data)
        records[p.id] = {"path": rel, "sha256": sha256_bytes(data)}
    return records


LABEL_SIGNATURES = "embeddings/text/label_signatures.npy"


def store_label_signatures(store, embedder, extra_labels: list[str]) -> dict:
    """The text signature of every effect-label word over the retrieval prompts (float64, one row
    per word), so the effect labels are computed without a model. Returns the manifest's
    ``label_signatures``: {path, sha256, words: [[group, word], ...]}."""
    from carlos_audit.case.labels import label_signatures
    from carlos_audit.case.protocol import load_prompts
    from carlos_audit.hashing import sha256_bytes
    from carlos_audit.casefolder.unit_store import npy_bytes

    retrieval, _ = load_prompts("builtin:retrieval")
    words, sigs = label_signatures(lambda texts: text_features(embedder, texts), [p.text for p in retrieval],
                                   extra_labels)
    data = npy_bytes(sigs, dtype="<f8")
    store.write_file(LABEL_SIGNATURES, data)
    return {"path": LABEL_SIGNATURES, "sha256": sha256_bytes(data), "words": [list(w) for w in words]}


def text_encoder_for(identity: str, *, checkpoint: str | None = None, allow_download: bool = False):
    """A function texts -> (n, d) raw text features, for the embedder a corpus was built with
    (its signature identity): what text retrieval (corpus/retrieval.retrieve) is given."""
    from carlos_audit.models.embedders import HF_IDENTITY_PREFIX, load_embedder

    if identity in ("embedded:tiny-hf-clip", "embedded:world-clip"):
        return _hf_text_encoder(identity, allow_download)
    if identity == "embedded:tiny-clip":
        emb = load_embedder("embedded:tiny-clip", None)
        return lambda texts: text_features(emb, texts)
    if identity.startswith("open_clip:"):
        name, _, tag = identity[len("open_clip:"):].partition("/")
        if tag.startswith("file:"):
            if not checkpoint:
                raise AuditError(f"the corpus embedder {identity} was loaded from a checkpoint file; pass --embedder-checkpoint PATH to that file")
            tag = checkpoint
        emb = load_embedder(name, tag, allow_download=allow_download)
        return lambda texts: text_features(emb, texts)
    if identity.startswith(HF_IDENTITY_PREFIX):
        return _hf_text_encoder(identity[len(HF_IDENTITY_PREFIX):], allow_download)
    raise AuditError(f"cannot load the text tower of embedder {identity!r}")


def _hf_text_encoder(repo: str, allow_download: bool):
    from carlos_audit.models.embedders import load_embedder

    try:
        emb = load_embedder(repo if repo.startswith("embedded:") else "hf:" + repo, None, allow_download=allow_download)
    except AuditError:
        cache = "models--" + repo.replace("/", "--")
        raise AuditError(
            f"the corpus was profiled with {repo} (transformers CLIPModel); its text tower is not in the local "
            f"Hugging Face cache ({cache}: config.json, model weights, tokenizer files); "
            "download it there, or pass --allow-download") from None
    return lambda texts: text_features(emb, texts)
