"""Analysis: the CARLoS metrics, further indicators and head-to-head, from stored features."""
