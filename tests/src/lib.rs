//! End-to-end tests of thumbup; see `tests/`.
