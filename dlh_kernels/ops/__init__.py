"""One module per op family: references, torch op declarations and the public functions."""
