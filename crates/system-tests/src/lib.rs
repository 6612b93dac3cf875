//! Tests and benches only: see `tests/` and `benches/`.
