"""Re-ranking the top-K predictions by local feature matching: the matchers, their features cache, the stage of a test."""
