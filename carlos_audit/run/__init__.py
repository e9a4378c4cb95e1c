"""Running a case: arm plan, model sessions, generation, embedding, the case store, cost,
environment and the GPU fast path."""
