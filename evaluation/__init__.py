"""Descriptors of a test set (extraction, frozen CPU inference, cache), the settings of an evaluation and its
records."""
