"""Reference corpora: the store, CARLoS import, builds, a case placed in a corpus, text retrieval."""
